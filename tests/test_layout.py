"""The layout the architecture promises (docs/architecture.md), checked on the real tree:
the engine imports no service dependency, nothing under src/tpi imports a service, and no
source file grows past the size a reader can hold."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ["src", "services", "webui", "bench", "tests"]
MAX_LINES = 450
SERVICE_PACKAGES = {"tpi_cli", "tpi_master", "tpi_worker", "tpi_webui", "services", "webui"}


def python_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_engine_imports_no_network_web_or_registry_package():
    probe = ("import sys, tpi.model, tpi.model.shard, tpi.weights.splitter, tpi.weights.scheduler, "
             "tpi.weights.store, tpi.generation, tpi.engine; "
             "print(sorted(m for m in ('websockets', 'flask', 'redis', 'docker', 'werkzeug') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_nothing_under_src_tpi_imports_a_service():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p)
                                                  if m.split(".")[0] in SERVICE_PACKAGES)
                 for p in python_files("src")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_source_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in python_files(*SOURCE_DIRS)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_netem_sidecar_loads_no_torch():
    """The sidecar (128 MiB limit) reads link specs from tpi.comm.link: that import must stay light."""
    probe = "import sys, tpi.comm.link; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
