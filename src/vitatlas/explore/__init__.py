"""The explorer: browse a dictionary's atoms, click patches, and edit atoms live, in the browser.

    vitatlas explore runs/ksvd runs/sae --acts acts/patches --cards cards/ksvd --cards cards/sae \
        --model embedded:dinov2-s --probe probe/          # http://127.0.0.1:8765
    vitatlas explore runs/ksvd --acts acts/patches --export site/    # a static site, no server

``Explorer`` (explorer.py) computes what every page shows from runs, a store and atom cards;
``server.create_app`` serves it as a Starlette app with a JSON API; ``export.export_site`` writes the
same pages as static files. The front end is plain HTML/CSS/JS in ``static/`` (no CDN, no build).
"""

from __future__ import annotations

from .explorer import Explorer, Run

__all__ = ["Explorer", "Run", "create_app", "export_site", "serve"]


def create_app(explorer: Explorer, **kwargs):
    from .server import create_app as _create_app

    return _create_app(explorer, **kwargs)


def export_site(explorer: Explorer, out, **kwargs):
    from .export import export_site as _export_site

    return _export_site(explorer, out, **kwargs)


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 8765, *, log_level: str = "warning") -> None:
    """Run the app with uvicorn until Ctrl-C."""
    import uvicorn

    from .server import create_app as _create_app
    from .server import local_hosts

    uvicorn.run(_create_app(explorer, allowed_hosts=local_hosts(host, port)), host=host, port=port,
                log_level=log_level)
