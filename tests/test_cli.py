"""The `lckv-vllm` command line: plan, make-model and import-llama, including their error messages."""

import json
from pathlib import Path
import subprocess
import sys

import torch

CLI = [sys.executable, "-m", "lckv_vllm.cli"]


def run(*args):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=120)


def test_plan_string_and_dir(model_dir):
    r = run("plan", "0_4_4_4_4_5", "--num-layers", "6", "--kv-heads", "2", "--head-dim", "32")
    assert r.returncode == 0, r.stderr
    assert "producers (layers with KV pages): 3 [0, 4, 5]" in r.stdout
    assert "3/6 = 0.5000" in r.stdout and "768 vs 1536" in r.stdout
    r = run("plan", str(model_dir("tiny-w10")))
    assert r.returncode == 0 and "force_nodiag: True" in r.stdout


def test_plan_dir_lists_the_deploy_patterns(model_dir):
    """Keep every k-th layer, k = 1..4: an identity checkpoint can be served with each."""
    r = run("plan", str(model_dir("tiny-identity")))
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split("deploy-time patterns", 1)[1]
    for name in ("checkpoint (= identity)", "cla-2", "cla-3", "cla-4"):
        assert name in listed, listed


def test_plan_errors_name_the_entry():
    r = run("plan", "0_4_4_x_4_5")
    assert r.returncode == 2 and "entry 3 is 'x'" in r.stderr
    r = run("plan", "0_1_2", "--num-layers", "4")
    assert r.returncode == 2 and "has 3 entries but num_hidden_layers is 4" in r.stderr


def test_make_model_writes_the_official_format(tmp_path):
    out = tmp_path / "m"
    r = run("make-model", "--layer-types", "0_2_2_3", "--num-layers", "4", "--hidden-size", "64", "--num-heads", "2",
            "--num-kv-heads", "1", "--force-nodiag", "--seed", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "lckv-llama" and cfg["architectures"] == ["LCKVLlamaForCausalLM"]
    assert cfg["layer_types"] == "0_2_2_3" and cfg["force_nodiag"] is True
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.2.self_attn.k_proj.weight" in keys
    assert "model.layers.1.self_attn.k_proj.weight" not in keys  # consumers carry no k/v projections
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    from transformers import AutoTokenizer

    import lckv_vllm

    lckv_vllm.register()  # vLLM does this in every process; here it teaches AutoConfig 'lckv-llama'

    assert len(AutoTokenizer.from_pretrained(str(out))) == 32000


def test_make_model_errors():
    r = run("make-model", "--layer-types", "0_9", "--num-layers", "2", "--out", "/tmp/never")
    assert r.returncode == 2 and "entry 1 is '9'" in r.stderr
    r = run("make-model", "--preset", "nope", "--out", "/tmp/never")
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr


def test_import_llama_round_trip_and_plans(model_dir, tmp_path):
    """Llama -> LCKV: identity keeps every tensor bit for bit; a w2 plan drops exactly the consumers' k/v."""
    from safetensors.torch import load_file

    from lckv_vllm.tools.checkpoint import export_llama

    llama = export_llama(model_dir("tiny-identity"), tmp_path / "llama")
    original = load_file(str(llama / "model.safetensors"))
    r = run("import-llama", str(llama), str(tmp_path / "ident"))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "ident" / "config.json").read_text())
    assert cfg["model_type"] == "lckv-llama" and cfg["architectures"] == ["LCKVLlamaForCausalLM"]
    assert cfg["layer_types"] == "0_1_2_3_4_5" and cfg["forward_passes"] == 7 and cfg["backward_passes"] == 2
    got = load_file(str(tmp_path / "ident" / "model.safetensors"))
    assert got.keys() == original.keys() and all(torch.equal(got[k], original[k]) for k in got)
    assert (tmp_path / "ident" / "tokenizer.json").exists()

    r = run("import-llama", str(llama), str(tmp_path / "w2"), "--layer-types", "0_4_4_4_4_5", "--force-nodiag")
    assert r.returncode == 0, r.stderr
    w2 = load_file(str(tmp_path / "w2" / "model.safetensors"))
    gone = sorted(original.keys() - w2.keys())
    assert gone == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (1, 2, 3) for p in "kv")
    assert json.loads((tmp_path / "w2" / "config.json").read_text())["force_nodiag"] is True


def test_import_llama_errors_name_the_problem(model_dir, tmp_path):
    r = run("import-llama", str(model_dir("tiny-w2")), str(tmp_path / "x"))
    assert r.returncode == 2 and "model_type is 'lckv-llama', expected 'llama'" in r.stderr
    from lckv_vllm.tools.checkpoint import export_llama

    llama = export_llama(model_dir("tiny-identity"), tmp_path / "llama")
    r = run("import-llama", str(llama), str(tmp_path / "y"), "--layer-types", "0_1_9_3_4_5")
    assert r.returncode == 2 and "entry 2" in r.stderr


def test_wheel_ships_no_tests_or_benchmarks(tmp_path):
    """kernels/ keeps tests and the benchmark beside the kernels; the wheel carries the kernels only."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("lckv_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lckv_vllm/kernels/paged_attention.py" in names and "lckv_vllm/engine/attention/step.py" in names
    shipped = [n for n in names if n.rsplit("/", 1)[-1].startswith(("test_", "conftest", "bench"))]
    assert shipped == [], shipped


def test_train_and_tokenizer_errors_name_the_field(model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be " * 400)
    r = run("make-tokenizer", "--text", str(text), "--vocab-size", "50", "--out", str(tmp_path / "tok"))
    assert r.returncode == 2 and "vocab_size" in r.stderr
    r = run("train", str(model_dir("tiny-identity")), "--out", str(tmp_path / "o"), "--text", str(text), "--resume")
    assert r.returncode == 2 and "--resume" in r.stderr and "train_state.pt" in r.stderr
    r = run("train", str(model_dir("tiny-identity")), "--out", str(tmp_path / "o"), "--text", str(text),
            "--save-dtype", "int8")
    assert r.returncode == 2 and "--save-dtype" in r.stderr
    r = run("train", str(model_dir("tiny-identity")), "--out", str(tmp_path / "o"), "--text", str(text),
            "--route-prob", "1.5")
    assert r.returncode == 2 and "--route-prob" in r.stderr
    r = run("train", str(model_dir("tiny-identity")), "--out", str(tmp_path / "o"), "--text", str(text),
            "--route-prob", "0.5", "--route-rule", "nearest")
    assert r.returncode == 2 and "--route-rule" in r.stderr and "keep-every" in r.stderr
    r = run("make-model", "--layer-types", "0_1", "--num-layers", "2", "--tokenizer", str(tmp_path / "nowhere"),
            "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "tokenizer" in r.stderr


def test_train_command_end_to_end(model_dir, tmp_path):
    """`lckv-vllm train` with a held-out file, periodic state and bf16 weights: a servable official-format folder."""
    import json

    text, held = tmp_path / "t.txt", tmp_path / "h.txt"
    text.write_text("to be or not to be, that is the question. " * 60)
    held.write_text("whether 'tis nobler in the mind to suffer. " * 20)
    r = run("train", str(model_dir("tiny-identity")), "--out", str(tmp_path / "o"), "--text", str(text),
            "--held-out", str(held), "--layer-types", "0_0_2_2_4_4", "--steps", "2", "--batch", "2", "--seq-len",
            "32", "--save-every", "1", "--save-dtype", "bfloat16", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "trained 2 of 2 steps" in r.stdout and "held-out loss" in r.stdout
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["layer_types"] == "0_0_2_2_4_4" and cfg["torch_dtype"] == "bfloat16"
    assert (tmp_path / "o" / "train_state.pt").exists() and (tmp_path / "o" / "tokenizer.json").exists()
    report = json.loads((tmp_path / "o" / "train_report.json").read_text())
    assert report["completed_steps"] == 2 and report["train_tokens"] > report["held_out_tokens"] > 0


def test_demo_points_at_the_committed_example_checkpoints():
    """`make demo`'s model paths are checkpoints committed under examples/ (config and weights present)."""
    from lckv_vllm.tools.demo import EXAMPLES

    for _, path in EXAMPLES:
        assert (path / "config.json").is_file() and any(path.glob("*.safetensors")), path
