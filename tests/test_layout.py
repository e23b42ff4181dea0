"""Package layout rules (README "Layout"): no module shadows a standard-library name, and launch
policy stays apart from the kernels (``triton_kernels/<op>_config.py`` imports no kernel)."""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_KERNELS = os.path.join(ROOT, "triton_kernels")


def _python_names(top: str):
    for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        yield from ((os.path.join(folder, d), d) for d in dirs)
        yield from ((os.path.join(folder, f), f[:-3]) for f in files if f.endswith(".py"))


def test_no_module_shadows_the_standard_library():
    # `python fastenc/x.py` or a tool run from inside a package puts its folder first on sys.path,
    # where a fastenc/inspect.py would replace the standard library's inspect for everything.
    shadowing = [os.path.relpath(path, ROOT) for top in ("fastenc", "triton_kernels", "tests", "benchmarks",
                                                         "scripts", "examples")
                 for path, name in _python_names(top) if name in sys.stdlib_module_names]
    assert not shadowing, f"modules named like standard-library modules: {shadowing}"


def test_config_modules_import_no_kernels():
    configs = sorted(f for f in os.listdir(TRITON_KERNELS) if f.endswith("_config.py"))
    assert {"attention_config.py", "layer_norm_config.py", "padding_config.py"} <= set(configs), configs
    for name in configs:
        with open(os.path.join(TRITON_KERNELS, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = ["." * node.level + (node.module or "")]
            else:
                continue
            for module in modules:
                local = module.startswith(".")
                assert not (local and not module.endswith("_config")), f"{name} imports the kernel module {module}"
                assert not module.startswith(("triton.language", "fastenc")), f"{name} imports {module}"
