import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ["generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py"]


def test_regenerating_the_stubs_changes_nothing(tmp_path):
    (tmp_path / "protos/kvtier/v1").mkdir(parents=True)
    shutil.copy(REPO / "protos/kvtier/v1/generation.proto", tmp_path / "protos/kvtier/v1/")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
         "protos/kvtier/v1/generation.proto"],
        cwd=tmp_path, check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "protos/kvtier/v1" / name).read_text()
        committed = (REPO / "protos/kvtier/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run scripts/gen_protos.sh"


def test_every_message_field_is_commented():
    lines = (REPO / "protos/kvtier/v1/generation.proto").read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("syntax", "package", "//"))
        if is_field:
            assert lines[number - 1].strip().startswith("//"), f"line {number + 1} has no comment: {stripped}"
