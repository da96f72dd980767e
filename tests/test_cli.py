"""The posenc command: in-process through main(argv), and once each through `python -m posenc`."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from posenc.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ": error: " in ln or ln.startswith("posenc ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # one line, the last one
    for n in needles:
        assert n in err, err


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory no file can be created in (root ignores permissions: then /proc, a read-only file system)."""
    if os.geteuid() == 0:
        yield "/proc"
        return
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    yield str(d)
    d.chmod(0o700)


@pytest.fixture
def no_long_work(monkeypatch):
    """Refusals must come before the long work: loading a model or running the benchmark fails the test."""
    from posenc import analysis, bench

    def boom(*a, **k):
        raise AssertionError("the long work started before the arguments were checked")
    monkeypatch.setattr(bench, "run", boom)
    monkeypatch.setattr(analysis, "load_model", boom)


# ------------------------------------------------------------------------------------------- freqs
@pytest.mark.parametrize("head_dim,base,context,complete", [(128, 10_000.0, 4096, 46), (64, 10_000.0, 512, 16),
                                                            (64, 100_000.0, 8192, 20)])
def test_freqs_json_against_independent_values(capsys, head_dim, base, context, complete):
    code, out, _ = run_main(capsys, "freqs", "--head-dim", str(head_dim), "--base", str(base), "--context",
                            str(context), "--p", "0.25", "--json")
    assert code == 0
    t = json.loads(out)
    pairs = head_dim // 2
    assert len(t["pairs"]) == pairs
    assert t["complete"] == complete and t["incomplete"] == pairs - complete
    for i, row in enumerate(t["pairs"]):
        w = base ** (-2 * i / head_dim)
        assert row["pair"] == i
        assert row["inv_freq"] == pytest.approx(w, rel=1e-12)
        assert row["wavelength"] == pytest.approx(2 * math.pi / w, rel=1e-12)
        assert row["periods"] == pytest.approx(context * w / (2 * math.pi), rel=1e-12)
        assert row["completes_period"] == (2 * math.pi / w <= context)
        assert row["rope"] is True
        assert row["prope"] == (i < int(0.25 * pairs))
        assert row["hope"] == row["completes_period"]
    assert t["rotated"] == {"rope": pairs, "prope": int(0.25 * pairs), "hope": complete}


def test_freqs_table_text(capsys):
    code, out, _ = run_main(capsys, "freqs", "--head-dim", "128", "--base", "10000", "--context", "4096")
    assert code == 0
    lines = out.splitlines()
    rows = [ln for ln in lines if ln.strip() and ln.split()[0].isdigit()]
    assert len(rows) == 64
    assert rows[46].split()[-1] == "-" and rows[45].split()[-1] == "yes"   # HoPE column
    assert "pairs completing a period within L=4096: 46 of 64" in out
    assert "pairs not completing a period within L: 18 (pairs 46..63" in out
    assert "HoPE 46" in out and "p-RoPE (p=0.75) 48" in out


def test_freqs_llama3_scaling_matches_transformers(capsys, tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192)
    config = LlamaConfig(hidden_size=1024, num_attention_heads=8, head_dim=128, rope_parameters=params)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    path = tmp_path / "f.json"
    code, _, _ = run_main(capsys, "freqs", "--head-dim", "128", "--base", "500000", "--context", "8192",
                          "--rope-type", "llama3", "--factor", "8", "--rope-param", "low_freq_factor=1",
                          "--rope-param", "high_freq_factor=4", "--rope-param",
                          "original_max_position_embeddings=8192", "--json", str(path))
    assert code == 0
    t = json.loads(path.read_text())
    inv = torch.tensor([r["inv_freq"] for r in t["pairs"]], dtype=torch.float64)
    torch.testing.assert_close(inv.float(), hf_inv.float(), rtol=2e-6, atol=0)
    # HoPE's rule applies to the scaled frequencies
    assert [r["hope"] for r in t["pairs"]] == [bool(2 * math.pi / w <= 8192) for w in inv.tolist()]
    assert t["complete"] == sum(2 * math.pi / w <= 8192 for w in inv.tolist())


@pytest.mark.parametrize("argv,needle", [
    (["--head-dim", "abc", "--context", "4096"], "--head-dim"),
    (["--head-dim", "63", "--context", "4096"], "even"),
    (["--head-dim", "64", "--context", "0"], "--context"),
    (["--head-dim", "64", "--context", "4096", "--base", "nan"], "--base"),
    (["--head-dim", "64", "--context", "4096", "--p", "1.5"], "--p"),
    (["--head-dim", "64", "--context", "4096", "--rope-type", "spiral"], "unknown rope type"),
    (["--head-dim", "64", "--context", "4096", "--rope-type", "llama3", "--factor", "8"], "low_freq_factor"),
    (["--head-dim", "64", "--context", "4096", "--rope-param", "oops"], "KEY=VALUE"),
])
def test_freqs_bad_input_is_a_clean_error(capsys, argv, needle):
    code, _, err = run_main(capsys, "freqs", *argv)
    assert_clean_error(code, err, needle)


def test_freqs_library_value_error_is_one_line(capsys):
    # dynamic rope with max_position_embeddings 0 (a ZeroDivisionError traceback before rope validation)
    code, _, err = run_main(capsys, "freqs", "--head-dim", "64", "--context", "512", "--rope-type", "dynamic",
                            "--factor", "2", "--rope-param", "max_position_embeddings=0")
    assert_clean_error(code, err, "max_position_embeddings")
    code, _, err = run_main(capsys, "freqs", "--head-dim", "2", "--context", "512", "--rope-type", "dynamic",
                            "--factor", "2", "--rope-param", "max_position_embeddings=16")
    assert_clean_error(code, err, "dynamic")


def test_freqs_json_into_a_directory(capsys, tmp_path):
    code, _, err = run_main(capsys, "freqs", "--head-dim", "8", "--context", "16", "--json", str(tmp_path))
    assert_clean_error(code, err, "--json", "is a directory")


# ------------------------------------------------------------------------------------------- analyze
def test_analyze_tiny_model_json_plot_and_text(capsys, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from posenc.analysis import DEFAULT_TEXT, MODEL_PRESETS
    cfg = dict(MODEL_PRESETS["tiny-llama"], num_hidden_layers=3)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "text.txt").write_text(DEFAULT_TEXT[:200])
    argv = ["analyze", str(tmp_path / "cfg.json"), "--text-file", str(tmp_path / "text.txt"), "--seed", "3",
            "--json", str(tmp_path / "r.json")]
    if importlib.util.find_spec("matplotlib"):
        argv += ["--plot", str(tmp_path / "plots")]
    code, out, err = run_main(capsys, *argv)
    assert code == 0, err
    assert "attention sinks" in out and "layer" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["layers"] == 3 and report["text"]["tokens"] == 200
    if "--plot" in argv:
        assert sorted(os.listdir(tmp_path / "plots")) == sorted(
            ["sink_share.png", "value_drain.png", "freq_energy_q.png", "freq_energy_k.png", "offset_k.png",
             "massive.png"])
    # the same model built independently (same seed), its eager attention by hand
    c = dict(cfg)
    config = AutoConfig.for_model(c.pop("model_type"), **c)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.tensor([[b % cfg["vocab_size"] for b in DEFAULT_TEXT[:200].encode()]])
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions
    for layer, entry in enumerate(report["layers"]):
        share = att[layer][0, :, 1:, 0].double().mean(-1)
        assert entry["sink_share"] == pytest.approx(share.tolist(), rel=1e-6)


def test_analyze_saved_model_directory(capsys, tmp_path):
    from posenc.analysis import DEFAULT_TEXT, load_model
    model, _, _ = load_model("tiny-llama", seed=5)
    model.save_pretrained(tmp_path / "model")
    code, out, err = run_main(capsys, "analyze", str(tmp_path / "model"), "--max-tokens", "12", "--json")
    assert code == 0, err
    report = json.loads(out)
    ids = torch.tensor([[b % model.config.vocab_size for b in DEFAULT_TEXT[:12].encode()]])
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions  # the same weights, reloaded
    assert report["layers"][1]["sink_share"] == pytest.approx(att[1][0, :, 1:, 0].double().mean(-1).tolist(),
                                                             rel=1e-6)


def test_analyze_json_to_stdout(capsys):
    code, out, _ = run_main(capsys, "analyze", "tiny-qwen3", "--max-tokens", "20", "--json")
    assert code == 0
    report = json.loads(out)  # stdout holds only the JSON
    assert report["model"]["type"] == "qwen3" and report["text"]["tokens"] == 20


def test_analyze_errors_are_clean(capsys, tmp_path):
    code, _, err = run_main(capsys, "analyze", str(tmp_path / "missing"))
    assert_clean_error(code, err, "no such model directory")
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, "analyze", str(tmp_path / "empty"))
    assert_clean_error(code, err, "no config.json")
    code, _, err = run_main(capsys, "analyze", str(tmp_path / "empty"), "--gguf-file", "x.gguf")
    assert_clean_error(code, err, "no GGUF file")
    code, _, err = run_main(capsys, "analyze", "tiny-llama", "--max-tokens", "-3")
    assert_clean_error(code, err, "--max-tokens")
    code2, _, err2 = run_main(capsys, "analyze", "tiny-llama", "--text", "a")
    assert_clean_error(code2, err2, "fewer than 2 tokens")
    (tmp_path / "gpt2.json").write_text(json.dumps(dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=16,
                                                        vocab_size=64, bos_token_id=0, eos_token_id=0)))
    code, _, err = run_main(capsys, "analyze", str(tmp_path / "gpt2.json"))
    assert_clean_error(code, err, "q_proj", "Llama")
    (tmp_path / "weird.json").write_text(json.dumps(dict(model_type="no-such-architecture")))
    code, _, err = run_main(capsys, "analyze", str(tmp_path / "weird.json"))
    assert_clean_error(code, err, "no-such-architecture")
    (tmp_path / "broken.json").write_text("{not json")
    code, _, err = run_main(capsys, "analyze", str(tmp_path / "broken.json"))
    assert_clean_error(code, err, "cannot read config")


@pytest.mark.parametrize("argv,needle", [(["--text", ""], "--text"), (["--text", " \n "], "--text"),
                                         (["--text-file", "EMPTY"], "--text-file")])
def test_analyze_empty_text_is_refused(capsys, tmp_path, no_long_work, argv, needle):
    (tmp_path / "empty.txt").write_text("")
    argv = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in argv]
    code, _, err = run_main(capsys, "analyze", "tiny-llama", *argv)
    assert_clean_error(code, err, needle, "empty")


def test_analyze_outputs_checked_before_loading(capsys, tmp_path, no_long_work, unwritable_dir):
    (tmp_path / "file").write_text("x")
    for argv, needles in [(["--json", str(tmp_path)], ("--json", "is a directory")),
                          (["--json", os.path.join(unwritable_dir, "r.json")], ("--json", "cannot write")),
                          (["--json", str(tmp_path / "no" / "r.json")], ("--json", "no such directory")),
                          (["--plot", str(tmp_path / "file")], ("--plot", "not a directory")),
                          (["--plot", os.path.join(unwritable_dir, "plots")], ("--plot",))]:
        code, _, err = run_main(capsys, "analyze", "tiny-llama", *argv)
        assert_clean_error(code, err, *needles)
        assert "loading" not in err


def test_analyze_invalid_config_is_one_line(capsys, tmp_path):
    cfg = dict(model_type="llama", hidden_size=30, num_attention_heads=4, num_hidden_layers=1, vocab_size=64,
               intermediate_size=32)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    code, _, err = run_main(capsys, "analyze", str(tmp_path / "cfg.json"))
    assert_clean_error(code, err, "hidden size (30) is not a multiple of the number of attention heads (4)")
    (tmp_path / "model").mkdir()  # the same config.json in a model directory
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_main(capsys, "analyze", str(tmp_path / "model"))
    assert_clean_error(code, err, "hidden size (30) is not a multiple of the number of attention heads (4)")


# ------------------------------------------------------------------------------------------- bench
def test_bench_outputs_checked_before_the_run(capsys, tmp_path, no_long_work, unwritable_dir):
    pytest.importorskip("matplotlib")
    (tmp_path / "d").mkdir()
    for argv, needles in [(["--json", str(tmp_path / "d")], ("--json", "is a directory")),
                          (["--json", os.path.join(unwritable_dir, "b.json")], ("--json", "cannot write")),
                          (["--plot", os.path.join(unwritable_dir, "b.png")], ("--plot", "cannot write")),
                          (["--plot", str(tmp_path / "d")], ("--plot", ".png")),
                          (["--plot", str(tmp_path / "b")], ("--plot", ".png"))]:
        code, _, err = run_main(capsys, "bench", "--preset", "tiny", "--device", "cpu", *argv)
        assert_clean_error(code, err, *needles)
        assert "bench [" not in err
    assert os.listdir(tmp_path / "d") == []


def test_atomic_write_leaves_old_file_or_none(tmp_path):
    from posenc import io
    path = tmp_path / "out.json"
    io.write_json({"a": 1}, path)
    assert json.loads(path.read_text()) == {"a": 1} and (path.stat().st_mode & 0o777) != 0o600
    with pytest.raises(TypeError):
        io.write_json({"a": object()}, path)  # fails half-way through the dump
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with io.atomic_write(tmp_path / "new.txt") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["out.json"]  # no temp files, no half-written new.txt


def test_bench_tiny_run(capsys, tmp_path):
    argv = ["bench", "--device", "cpu", "--preset", "tiny", "--dtype", "float32", "--encoding", "rope",
            "--json", str(tmp_path / "b.json")]
    if importlib.util.find_spec("matplotlib"):
        argv += ["--plot", str(tmp_path / "b.png")]
    code, out, err = run_main(capsys, *argv)
    assert code == 0, err
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["method"] for r in rows] == ["copy", "posenc", "hf_eager"]
    assert all(r["check"] in ("floor", "ok") and r["us"] > 0 for r in rows), rows
    assert all(r["dtype"] == "float32" and r["encoding"] == "rope" for r in rows)
    assert "hf_eager" in out and "x_copy" in out  # the table on stdout
    progress = [ln for ln in err.splitlines() if ln.startswith("bench [")]
    assert [ln.split()[2] for ln in progress] == ["1/3", "2/3", "3/3"]  # progress on stderr (not a terminal)
    if "--plot" in argv:
        assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
        assert f"wrote {tmp_path / 'b.png'}" in err
    assert sorted(os.listdir(tmp_path)) == sorted(["b.json"] + (["b.png"] if "--plot" in argv else []))
    # a shape given on the command line, JSON on stdout, no progress
    code, out, err = run_main(capsys, "bench", "--device", "cpu", "--shape", "1,4,2,1,16", "--dtype", "float32",
                              "--method", "posenc", "--iters", "1", "--warmup", "0", "--json", "-q")
    assert code == 0, err
    rows = json.loads(out)
    assert {(r["B"], r["S"], r["Hq"], r["Hk"], r["D"]) for r in rows} == {(1, 4, 2, 1, 16)}
    assert "bench [" not in err
    code, _, err = run_main(capsys, "bench", "--preset", "no-such-preset")
    assert_clean_error(code, err, "no-such-preset")
    code, _, err = run_main(capsys, "bench", "--preset", "tiny", "--dtype", "int7")
    assert_clean_error(code, err, "int7")
    code, _, err = run_main(capsys, "bench", "--shape", "1,8,2")
    assert_clean_error(code, err, "--shape")


class _Stream:
    """A stderr stand-in: what was written, and whether it says it is a terminal."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_progress_log_lines_every_5_percent_and_the_end():
    from posenc.progress import Progress
    stream = _Stream(tty=False)
    bar = Progress("finetune", 100, start=40, stream=stream)
    for step in range(41, 101):
        bar.update(step, f"loss {step}")
    lines = stream.text.splitlines()
    assert [ln.split()[2] for ln in lines] == ["41/100"] + [f"{n}/100" for n in range(46, 100, 5)] + ["100/100"]
    assert all(ln.startswith("finetune [") for ln in lines) and lines[-1].endswith("loss 100")
    assert "eta" in lines[0] and "eta" not in lines[-1]
    assert lines[-1].split()[1] == "[" + "#" * 24 + "]" and lines[0].split()[1] == "[" + "#" * 9 + "." * 15 + "]"
    bar.close()
    assert stream.text.count("\n") == len(lines)  # no extra blank line off a terminal


def test_progress_on_a_terminal_is_one_line_rewritten(monkeypatch):
    from posenc import progress as P
    clock = iter(range(1000))
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock) * 0.06)  # 0.06 s between calls
    stream = _Stream(tty=True)
    bar = P.Progress("eval", stream=stream)
    for done in range(1, 11):
        bar(done, 10, f"nope {done}")  # the callback form: the total comes with each call
    draws = stream.text.split("\r\033[K")[1:]
    assert 3 <= len(draws) <= 7  # at most one redraw per 0.1 s, except the last
    assert draws[-1].startswith("eval [" + "#" * 24 + "] 10/10") and draws[-1].endswith("nope 10\n")
    assert all("\n" not in d for d in draws[:-1])
    bar.close()
    assert stream.text.endswith("nope 10\n")  # closing twice adds nothing


def test_progress_quiet_writes_nothing():
    from posenc.progress import Progress
    for tty in (False, True):
        stream = _Stream(tty)
        bar = Progress("bench", 3, quiet=True, stream=stream)
        bar.step()
        bar(3, 3, "done")
        bar.close()
        assert stream.text == "" and bar.done == 3


def test_bench_tables_method_matches_posenc():
    """posenc_tables (the op reading cos/sin tables) agrees with posenc (angles from frequencies) in every
    pass, for partial encodings too: a wrong table half or a wrong pair count shows as a MISMATCH."""
    from posenc import bench
    shape = bench.Shape("t", 2, 5, 3, 1, 32)
    cases = [bench.Case(shape, enc, ("fwd", "fwd_inplace", "fwd+bwd", "decode")) for enc in ("rope", "prope:0.5", "hope:16")]
    rows = bench.run("cpu", shapes=cases, dtypes=["float32"], methods=["copy", "posenc", "posenc_tables"],
                     iters=1, warmup=0, repeats=1)
    tables = [r for r in rows if r["method"] == "posenc_tables"]
    assert len(tables) == 12 and all(r["check"] == "ok" for r in tables), [r["check"] for r in tables]


def test_bench_encodings_are_specs_checked_before_any_timing():
    from posenc import bench

    def no_progress(*a):
        raise AssertionError("the benchmark started before its encodings were checked")
    for bad in ("hope:0", "yarn", "original", "hope@0-1", "rope:5"):
        with pytest.raises(ValueError, match="encoding"):
            bench.run("cpu", shapes="tiny", encodings=[bad], progress=no_progress)
    with pytest.raises(ValueError, match="unknown encoding"):  # a preset or Case names one too
        bench.run("cpu", shapes=[bench.Case(bench.TINY, "alibi")], progress=no_progress)
    cases, _ = bench._cases("cpu", "llama-8b", ["p-rope:0.5", "HoPE"], None)  # aliases and case as specs do
    assert sorted(c.encoding for c in cases) == ["hope:4096", "prope:0.5"]


def test_bench_rotary_script_is_the_bench_command():
    script = os.path.join(ROOT, "benchmarks", "bench_rotary.py")
    r = subprocess.run([sys.executable, script, "--device", "cpu", "--preset", "tiny", "--iters", "1", "--json",
                        "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [row["method"] for row in json.loads(r.stdout)] == ["copy", "posenc", "hf_eager"]
    r = subprocess.run([sys.executable, script, "--preset", "no-such-preset"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no-such-preset" in r.stderr


# ------------------------------------------------------------------------------------------- python -m posenc
def _python_m(*argv):
    return subprocess.run([sys.executable, "-m", "posenc", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_python_m_posenc_freqs_and_errors():
    r = _python_m("freqs", "--head-dim", "128", "--base", "10000", "--context", "4096", "--json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)
    assert (t["complete"], t["incomplete"]) == (46, 18)
    r = _python_m("freqs", "--head-dim", "12x", "--context", "4096")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--head-dim" in r.stderr


def test_python_m_posenc_analyze():
    r = _python_m("analyze", "tiny-llama", "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert "attention sinks" in r.stdout and "massive activations" in r.stdout
    r = _python_m("analyze", "/no/such/model/dir")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such model directory" in r.stderr


@pytest.mark.parametrize("argv,needle", [
    (["eval", "tiny-llama", "--bogus"], "--bogus"),
    (["finetune", "tiny-llama"], "--encoding, --output"),
    (["analyze"], "model"),
    (["bench", "--iters", "0"], "--iters"),
    (["--bogus"], "required: {bench"),
])
def test_argument_errors_are_one_line_for_every_command(capsys, argv, needle):
    # argparse's default prints the whole usage before the error (17 lines for finetune)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and "--help" in err, err
