"""Without the compiled op, posenc still imports (one warning) and runs the reference; REQUIRE makes it fail."""
import os
import subprocess
import sys

import posenc

BLOCK = """
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "posenc._C":
            raise ImportError("blocked by the test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import posenc
import torch
print(sum("compiled rotary op did not load" in str(w.message) for w in caught))
print(posenc.backend("cpu"))
q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
enc = posenc.RoPE(8)
q2, _ = enc.apply(q, k, torch.tensor([5, 6, 7]))
ref = posenc.ops.rotary_reference(q, k, None, None, enc.inv_freq64, torch.tensor([[5, 6, 7]]), 1.0, 8, 4, False, False)
print(torch.equal(q2, ref[0]))
"""


def run(env_extra):
    env = {k: v for k, v in os.environ.items() if k != "POSENC_REQUIRE_EXTENSION"}  # CI sets it
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, env=env)


def test_falls_back_to_reference_with_one_warning():
    result = run({})
    assert result.returncode == 0, result.stderr
    warnings, backend, equal = result.stdout.split("\n")[:3]
    assert warnings == "1"
    assert backend.startswith("pure-PyTorch reference on cpu") and "blocked by the test" in backend
    assert equal == "True"


def test_require_extension_makes_it_an_error():
    result = run({"POSENC_REQUIRE_EXTENSION": "1"})
    assert result.returncode != 0
    assert "POSENC_REQUIRE_EXTENSION=1 but posenc._C failed to load" in result.stderr


def test_backend_names_the_compiled_kernel():
    if posenc.ops._EXTENSION:
        assert posenc.backend("cpu") == "C++ CPU kernel (posenc._C)"
    assert "cuda" in posenc.backend("cuda").lower()
