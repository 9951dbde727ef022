import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import peft_kernels as pk


def test_build_info_keys_and_values():
    info = pk.build_info()
    assert set(info) >= {"version", "torch", "cuda", "cuda_version", "archs", "ops"}
    assert info["version"] == pk.__version__
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    assert "lora_linear" in info["ops"]
    assert info["cpu_isa"] in ("avx512", "avx2", "generic")
    if not info["cuda"]:
        assert info["cuda_version"] is None and info["archs"] == ""


def test_info_command_prints_build_info():
    out = subprocess.run([sys.executable, "-m", "peft_kernels", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "version" in out and pk.__version__ in out and "lora_linear" in out


def test_missing_extension_gives_one_clear_error(monkeypatch):
    from peft_kernels import _ext

    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_load_error", ImportError("libfoo.so: cannot open shared object file"))
    with pytest.raises(_ext.ExtensionNotBuiltError, match="pip install --no-build-isolation"):
        pk.ops.lora_linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(1, 3), torch.randn(4, 1))


def test_source_distribution_carries_the_build_sources(tmp_path):
    # pip builds an sdist's extension from its CMakeLists.txt and csrc/: both must be in it.
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "--dist-dir", str(tmp_path)], cwd=root, check=True,
                   capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = {p.relative_to(root).as_posix() for p in (root / "csrc").rglob("*") if p.is_file()}
    assert sources and sources <= names, sorted(sources - names)
    assert "CMakeLists.txt" in names and "setup.py" in names and "pyproject.toml" in names
