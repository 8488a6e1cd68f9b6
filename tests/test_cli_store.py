import numpy as np
from click.testing import CliRunner

from vitatlas import ActivationStore
from vitatlas.cli import main


def invoke(*args):
    result = CliRunner().invoke(main, list(map(str, args)), standalone_mode=False, catch_exceptions=True)
    return result


def run_cli(args, capsys):
    """Run through the real entry point so VitatlasError becomes a one-line message and exit status 2."""
    import sys

    from vitatlas.cli import run

    old = sys.argv
    sys.argv = ["vitatlas", *map(str, args)]
    try:
        run()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def test_from_npy_info_verify(tmp_path, capsys):
    X = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    np.save(tmp_path / "emb.npy", X)
    (tmp_path / "labels.txt").write_text("\n".join(["cat", "dog"] * 25))
    code, out, err = run_cli(["store", "from-npy", tmp_path / "emb.npy", "--labels", tmp_path / "labels.txt",
                              "--out", tmp_path / "s", "--dtype", "float16"], capsys)
    assert code == 0, err
    store = ActivationStore(tmp_path / "s")
    assert store.shape == (50, 8) and store.class_names == ["cat", "dog"] and store.labels[1] == 1
    code, out, _ = run_cli(["store", "info", tmp_path / "s"], capsys)
    assert code == 0 and "50 x d=8" in out and "cat=25" in out
    assert "written by 1 process(es) in its last run\n" in out
    code, out, _ = run_cli(["store", "verify", tmp_path / "s"], capsys)
    assert code == 0 and out.startswith("ok:")


def test_verify_failure_is_one_line(tmp_path, capsys):
    ActivationStore.from_array(tmp_path / "s", np.ones((20, 4), np.float32))
    shard = tmp_path / "s" / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    code, out, err = run_cli(["store", "verify", tmp_path / "s"], capsys)
    assert code == 2
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("error:") and "checksum" in error_lines[0]


def test_from_npy_errors(tmp_path, capsys):
    code, _, err = run_cli(["store", "from-npy", tmp_path / "missing.npy", "--out", tmp_path / "s"], capsys)
    assert code == 2 and "no such file" in err
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    code, _, err = run_cli(["store", "from-npy", tmp_path / "bad.npy", "--out", tmp_path / "s"], capsys)
    assert code == 2 and "not a readable .npy" in err
    np.save(tmp_path / "x.npy", np.ones((5, 3), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(4, np.int64))
    code, _, err = run_cli(["store", "from-npy", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                            "--out", tmp_path / "s2"], capsys)
    assert code == 2 and "4 labels but" in err


def test_bad_groups_are_one_line_errors_for_both_learners(tmp_path, capsys):
    ActivationStore.from_array(tmp_path / "s", np.ones((20, 4), np.float32))
    for learner in (["dbksvd"], ["sae", "--kind", "matryoshka"]):
        code, _, err = run_cli(["fit", *learner, "--acts", tmp_path / "s", "--atoms", "8", "--k", "2",
                                "--groups", "4,x", "--out", tmp_path / "run"], capsys)
        assert code == 2 and err.strip().splitlines()[-1] == \
            "error: --groups must be comma-separated integers like 64,256,1024; got '4,x'"
