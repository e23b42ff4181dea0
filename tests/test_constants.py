"""One source for the constants Python and C++ share (fastenc/constants.py): the header the build generates from
it (build_tools/constants_header.py), and the built extension, which must agree with it value by value and in
behaviour (the activations it parses, the dtypes it runs, the oneDNN threshold its FFN reports)."""
import os
import re
import sys

import pytest
import torch

from fastenc import constants
from fastenc.backends import extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # build_tools/ is not installed
from build_tools import constants_header  # noqa: E402

VALUES = {k: v for k, v in vars(constants).items() if k.isupper()}


def _ext():
    if os.environ.get("FASTENC_SKIP_NATIVE", "0").lower() in ("1", "true", "yes", "on"):
        pytest.skip("extension deliberately not built (FASTENC_SKIP_NATIVE)")
    ext = extension()
    assert ext is not None, "fastenc._C is not built: pip install --no-build-isolation -e ."
    return ext


def test_generator_reads_every_constant():
    assert constants_header.read_constants() == VALUES
    text = constants_header.header_text(VALUES)
    assert "inline constexpr int64_t kOnednnMinMacs = 2097152;" in text
    assert 'kActivations = {"relu", "gelu", "gelu_tanh"};' in text
    assert re.search(r"#define FASTENC_CONSTANTS\(X\)(.|\n)*X\(KERNEL_DTYPES, kKernelDtypes\)", text)


def test_generator_rejects_what_cpp_cannot_hold(tmp_path):
    src = tmp_path / "constants.py"
    for body, error in [("X = compute()\n", ValueError), ("import os\n", ValueError), ("X = 1.5\n", TypeError),
                        ("X = ('a', 2)\n", TypeError), ("X = True\n", TypeError), ('X = ("a\\\\b",)\n', TypeError)]:
        src.write_text('"""doc"""\n' + body)
        with pytest.raises(error):
            constants_header.header_text(constants_header.read_constants(str(src)))


def test_header_is_rewritten_only_when_it_changes(tmp_path):
    root = tmp_path / "src"
    (root / "fastenc").mkdir(parents=True)
    (root / "fastenc" / "constants.py").write_text("A = 1 << 3\n")
    path = constants_header.write_header(str(tmp_path / "gen"), root=str(root))
    os.utime(path, (1, 1))
    constants_header.write_header(str(tmp_path / "gen"), root=str(root))
    assert os.stat(path).st_mtime == 1, "an unchanged header was rewritten (ninja would recompile its includers)"
    (root / "fastenc" / "constants.py").write_text("A = 1 << 4\n")
    constants_header.write_header(str(tmp_path / "gen"), root=str(root))
    assert "kA = 16;" in open(path).read()


def test_extension_was_built_from_these_constants():
    assert _ext().CONSTANTS == VALUES


def test_extension_parses_exactly_the_activations():
    ext = _ext()
    names = constants.ACTIVATIONS + constants.GATED_ACTIVATIONS
    assert tuple(ext.FFN_ACTIVATIONS) == names
    for name in names:  # parse_activation maps each name to the enum member of the same place
        path, _ = ext.ffn_plan("cpu", 0, "float32", 16, 32, name, 0.0, False, True, "auto")
        assert path in ("cpu", "unfused")
    with pytest.raises(ValueError, match=re.escape("expected one of " + ", ".join(names))):
        ext.ffn_plan("cpu", 0, "float32", 16, 32, "gelu_erf", 0.0, False, True, "auto")


def test_extension_runs_exactly_the_kernel_dtypes():
    ext = _ext()
    w1, w2 = torch.randn(8, 4), torch.randn(4, 8)
    for name in constants.KERNEL_DTYPES:
        dt = getattr(torch, name)
        y, _, _ = ext.ffn_forward(torch.randn(3, 4, dtype=dt), w1.to(dt), None, w2.to(dt), None, None, "relu", 0.0,
                                  0, "auto", False)
        assert y.dtype == dt and y.shape == (3, 4)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ext.ffn_forward(torch.randn(3, 4, dtype=torch.float64), w1.double(), None, w2.double(), None, None, "relu",
                        0.0, 0, "auto", False)


def test_extension_reports_the_onednn_threshold():
    _, why = _ext().ffn_plan("cpu", 0, "float32", 16, 32, "gelu", 0.0, False, True, "auto")
    if "oneDNN GEMMs" in why:  # a torch with oneDNN: the reason names the threshold
        assert f"below 2^{constants.ONEDNN_MIN_MACS.bit_length() - 1} multiply-adds" in why, why
