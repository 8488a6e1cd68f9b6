"""Images of a store, back from its source, as the model saw them (PNG bytes for the pages).

The interpretation work's ``load_images`` re-opens the store's image source and applies the model's
resize/crop; the explorer uses it and keeps a small cache of encoded PNGs so that paging through an
atom's top images does not decode the source again.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image

from ..data.store import ActivationStore


def load_store_images(store: ActivationStore, image_ids: list[int]) -> list[Image.Image]:
    """Model-input crops (RGB, before normalisation) of ``image_ids``, or a one-line error."""
    from ..interpret.images import load_images

    return list(load_images(store, [int(i) for i in image_ids]))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class ImageCache:
    """PNG bytes of store images, least-recently-used first out; thread-safe."""

    def __init__(self, store: ActivationStore, size: int = 512):
        self.store = store
        self.size = size
        self._png: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def png(self, image_id: int) -> bytes:
        with self._lock:
            if image_id in self._png:
                self._png.move_to_end(image_id)
                return self._png[image_id]
        data = png_bytes(load_store_images(self.store, [image_id])[0])
        with self._lock:
            self._png[image_id] = data
            while len(self._png) > self.size:
                self._png.popitem(last=False)
        return data

    def pil(self, image_id: int) -> Image.Image:
        return Image.open(io.BytesIO(self.png(image_id))).convert("RGB")
