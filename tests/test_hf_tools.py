"""Hugging Face tools on the project's checkpoints (docs/hf_tools.md).

Stock `AutoTokenizer.from_pretrained(checkpoint)` reads config.json before tokenizer_config.json and cannot parse the
official LCKV config on its own.  Where lckv-vllm is installed, its start-up hook (`lckv_vllm-autoconfig.pth`,
lckv_vllm/hf_autoconfig.py) registers the config class when transformers' auto-config module is imported, so stock
AutoTokenizer works in a fresh interpreter without importing the plugin or vLLM.  With the hook off
(`LCKV_HF_AUTOCONFIG=0`: as if the plugin were not installed) the plugin-free routes `lckv-vllm export-tokenizer`
and `PreTrainedTokenizerFast.from_pretrained(checkpoint)` remain.  Every route runs in a fresh interpreter and must
give the ids of the tokenizer loaded with the plugin's config registered in-process."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lckv_vllm.cli import main as cli
from lckv_vllm.hf_autoconfig import AutoConfigHook

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "shakespeare-lckv-w2"
PTH = "lckv_vllm-autoconfig.pth"
TEXTS = ["To be, or not to be: that is the question.", "  two leading spaces\nand a newline",
         "caf\u00e9 \u2014 \u00fcber na\u00efve \U0001F600", "<s> literal specials </s>", ""]

# Run in a fresh interpreter: try each (route, folder) and report ids / chat template, or the exception's type; then
# what the interpreter imported.
PROBE = r"""
import json, sys
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast
texts = json.loads(sys.argv[1])
out = []
for route, folder in json.loads(sys.argv[2]):
    cls = AutoTokenizer if route == "auto" else PreTrainedTokenizerFast
    try:
        tok = cls.from_pretrained(folder)
    except Exception as e:
        out.append({"error": type(e).__name__})
        continue
    out.append({"ids": [tok.encode(t) for t in texts], "chat_template": tok.chat_template})
try:
    config = type(AutoConfig.from_pretrained(json.loads(sys.argv[2])[0][1])).__name__
except Exception as e:
    config = type(e).__name__
print(json.dumps({"routes": out, "config": config, "vllm": "vllm" in sys.modules,
                  "plugin": "lckv_vllm.config" in sys.modules,
                  "hook_left": not any(type(f).__name__ == "AutoConfigHook" for f in sys.meta_path)}))
"""


def probe(*jobs: tuple[str, Path], hook: bool = True) -> dict:
    env = {**os.environ, "LCKV_HF_AUTOCONFIG": "1" if hook else "0"}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(TEXTS), json.dumps([(a, str(f)) for a, f in jobs])],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RuntimeWarning" not in r.stderr, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def with_plugin(folder: Path) -> dict:
    """The tokenizer as the plugin loads it: `register()`'s AutoConfig registration (register_hf_config), in-process."""
    from transformers import AutoTokenizer

    from lckv_vllm.config import register_hf_config

    register_hf_config()
    tok = AutoTokenizer.from_pretrained(str(folder))
    return {"ids": [tok.encode(t) for t in TEXTS], "chat_template": tok.chat_template}


@pytest.fixture(scope="module")
def checkpoints(model_dir):
    return {"example": EXAMPLE, "tiny-w2": model_dir("tiny-w2")}


def test_format_stays_official(checkpoints):
    """The fix must not touch config.json: model_type lckv-llama, layer_types the official string."""
    for ckpt in checkpoints.values():
        cfg = json.loads((ckpt / "config.json").read_text())
        assert cfg["model_type"] == "lckv-llama" and cfg["architectures"] == ["LCKVLlamaForCausalLM"], ckpt
        assert isinstance(cfg["layer_types"], str) and cfg["layer_types"].count("_") == cfg["num_hidden_layers"] - 1


def test_stock_autotokenizer_loads_the_checkpoints_where_the_plugin_is_installed(checkpoints):
    results = probe(*[("auto", ckpt) for ckpt in checkpoints.values()])
    for name, got in zip(checkpoints, results["routes"]):
        want = with_plugin(checkpoints[name])
        assert got == want, name
        assert want["ids"][0][0] == 1 and want["chat_template"], name  # BOS first; the chat template came along
    assert results["config"] == "LCKVLlamaConfig"
    assert not results["vllm"], "the start-up hook must not import vLLM"
    assert results["hook_left"], "the hook is one-shot: it leaves sys.meta_path once it has registered"


def test_plugin_free_routes_give_the_plugins_ids(checkpoints, tmp_path):
    """With the hook off the interpreter behaves as if the plugin were not installed: AutoTokenizer on the checkpoint
    fails (docs state it), the exported folder and PreTrainedTokenizerFast still give the plugin's ids."""
    jobs, expected = [], []
    for name, ckpt in checkpoints.items():
        exported = tmp_path / name
        assert cli(["export-tokenizer", str(ckpt), str(exported)]) == 0
        assert not (exported / "config.json").exists()
        jobs += [("auto", ckpt), ("auto", exported), ("fast", ckpt)]
        expected.append(with_plugin(ckpt))
    results = probe(*jobs, hook=False)
    assert not results["plugin"] and results["config"] == "ValueError"
    for i, (name, want) in enumerate(zip(checkpoints, expected)):
        in_place, exported, fast = results["routes"][3 * i:3 * i + 3]
        assert "error" in in_place, f"{name}: AutoTokenizer loads the checkpoint without the plugin; update docs"
        assert exported == want, name
        assert fast == want, name


def test_startup_hook_is_installed_and_shipped(tmp_path):
    """The .pth sits at the top of this environment's site-packages (the editable install CI uses), and a wheel built
    from the repository carries it at its root (what `pip install lckv-vllm` puts into site-packages)."""
    installed = [Path(d) / PTH for d in site.getsitepackages() if (Path(d) / PTH).is_file()]
    assert installed, f"{PTH} is not in {site.getsitepackages()}: reinstall (make setup)"
    assert installed[0].read_text() == (ROOT / PTH).read_text()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("lckv_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert PTH in names and "lckv_vllm/hf_autoconfig.py" in names
    assert not any(Path(n).name.startswith("test_") for n in names)  # kernels' tests stay in the repository


def test_hook_is_one_shot_and_off_switch(monkeypatch):
    """install() adds one finder, only when enabled; a second install() adds none."""
    from lckv_vllm import hf_autoconfig

    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, AutoConfigHook)])
    monkeypatch.delitem(sys.modules, hf_autoconfig.TARGET)  # as in a fresh interpreter
    monkeypatch.setenv(hf_autoconfig.ENV, "0")
    hf_autoconfig.install()
    assert not any(isinstance(f, AutoConfigHook) for f in sys.meta_path)
    monkeypatch.setenv(hf_autoconfig.ENV, "1")
    hf_autoconfig.install()
    hf_autoconfig.install()
    assert sum(isinstance(f, AutoConfigHook) for f in sys.meta_path) == 1


def test_export_tokenizer_errors(tmp_path, capsys):
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert cli(["export-tokenizer", str(empty), str(tmp_path / "out")]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli(["export-tokenizer", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli(["export-tokenizer", str(EXAMPLE), str(EXAMPLE)]) == 2
    assert "another folder" in capsys.readouterr().err


def test_make_model_takes_its_tokenizer_from_a_checkpoint(tmp_path):
    """`make-model --tokenizer CHECKPOINT` counts the vocabulary with AutoTokenizer: it must not trip over the
    checkpoint's config.json in a process where the plugin was never registered."""
    code = ("import sys; from pathlib import Path; from lckv_vllm.tools.checkpoint import write_tokenizer; "
            "print(write_tokenizer(Path(sys.argv[2]), sys.argv[1]))")
    r = subprocess.run([sys.executable, "-c", code, str(EXAMPLE), str(tmp_path)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == "4096"
