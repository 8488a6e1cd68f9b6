"""``--device`` on every command: a device this machine does not have is a one-line error, on any machine.

The CPU-side half of the CUDA checks (``test_cuda.py`` is skipped without a GPU): ``cuda:99`` exists
nowhere, so each command must refuse it with a ``VitatlasError`` naming the device before any work,
never a torch traceback. The commands run in-process (``main(..., standalone_mode=False)``), where
``vitatlas``'s entry point would print the error as ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import pytest
from _tiny import save_tiny_dinov2

import vitatlas
from vitatlas import VitatlasError
from vitatlas.cli import main
from vitatlas.data.extract import extract

MISSING = "cuda:99"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-option")
    model = f"hf:{save_tiny_dinov2(root / 'tiny')}"
    extract(model, "embedded:digits", [1], "patches", root / "acts", limit=8, progress=False)
    store = vitatlas.ActivationStore(root / "acts")
    vitatlas.DBKSVD(16, 2, epochs=1).fit(store, progress=False).save(root / "run")
    main(["probe", "train", "--model", model, "--data", "embedded:digits", "--task", "classification",
          "--limit", "8", "--out", str(root / "probe"), "--no-progress"], standalone_mode=False)
    return {"root": root, "model": model}


COMMANDS = {
    "extract": "extract --model {model} --data embedded:digits --layer 1 --tokens cls --limit 4 --out {root}/x",
    "fit dbksvd": "fit dbksvd --acts {root}/acts --atoms 16 --k 2 --out {root}/f1",
    "fit sae": "fit sae --kind topk --acts {root}/acts --atoms 16 --k 2 --out {root}/f2",
    "eval": "eval {root}/run --acts {root}/acts --out {root}/e",
    "interpret": "interpret {root}/run --acts {root}/acts --out {root}/c",
    "probe train": "probe train --model {model} --data embedded:digits --task classification --limit 4 --out {root}/p",
    "intervene": "intervene {root}/run --model {model} --data embedded:digits --task classification "
                 "--probe {root}/probe --limit 4 --out {root}/i",
    "explore": "explore {root}/run --acts {root}/acts --export {root}/ex",
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_missing_device_is_a_one_line_error(env, command):
    args = COMMANDS[command].format(**env).split() + ["--device", MISSING]
    with pytest.raises(VitatlasError, match="cuda:99") as info:
        main(args, standalone_mode=False)
    assert "\n" not in str(info.value)
