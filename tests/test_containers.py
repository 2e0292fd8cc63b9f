"""Static checks of containers/ (Docker cannot run here): the compose file parses and is
consistent, and the Dockerfiles' dependency extraction works on the real pyproject.toml."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"


def _compose() -> dict:
    return yaml.safe_load((CONTAINERS / "compose.yaml").read_text())


def test_compose_services_and_wiring():
    c = _compose()
    services = c["services"]
    assert {"prefect-server", "mlflow", "worker"} <= set(services)
    assert [_port(p, {}) for p in services["prefect-server"]["ports"]] == [("127.0.0.1", "4200", "4200")]
    assert [_port(p, {}) for p in services["mlflow"]["ports"]] == [("127.0.0.1", "5000", "5000")]
    assert "sqlite" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=sqlite:////data/mlflow/" in mlflow_cmd
    assert "--artifacts-destination=/data/mlflow/" in mlflow_cmd
    # every named volume used by a service is declared
    declared = set(c["volumes"])
    for svc in services.values():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in declared, f"volume {src} not declared"

    for name in ("worker", "worker-gpu"):
        w = services[name]
        assert w["command"] == ["python", "-m", "flows.serve"]
        assert "..:/app" in w["volumes"]  # the project is mounted
        env = w["environment"]
        api, ml = urlparse(env["PREFECT_API_URL"]), urlparse(env["MLFLOW_TRACKING_URI"])
        assert (api.hostname, api.port, api.path) == ("prefect-server", 4200, "/api")
        assert (ml.hostname, ml.port) == ("mlflow", 5000)
        assert set(w["depends_on"]) == {"prefect-server", "mlflow"}
    # MLflow 3 answers 403 to Host headers it does not allow: the worker's must be allowed
    allowed = re.search(r"--allowed-hosts=(\S+)", mlflow_cmd).group(1).split(",")
    assert "mlflow:5000" in allowed and "mlflow" in allowed
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}`` substitution."""
    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", sub, text)


def _port(entry, env: dict[str, str]) -> tuple[str, str, str]:
    """(host ip, host port, container port) of a published port, short or long syntax; a port
    without a host ip is published on every interface ("0.0.0.0")."""
    if isinstance(entry, dict):
        return (_interpolate(str(entry.get("host_ip", "0.0.0.0")), env),
                str(entry.get("published", "")), str(entry["target"]))
    parts = _interpolate(str(entry), env).rsplit(":", 2)
    if len(parts) == 1:
        return "0.0.0.0", "", parts[0]
    if len(parts) == 2:
        return "0.0.0.0", parts[0], parts[1]
    return parts[0].strip("[]"), parts[1], parts[2]


def test_every_published_port_binds_loopback_by_default():
    """Prefect and MLflow have no authentication (MLflow serves artifacts): published on
    127.0.0.1 unless MOPD_BIND says otherwise."""
    published = {name: svc.get("ports", []) for name, svc in _compose()["services"].items()}
    assert published["prefect-server"] and published["mlflow"]
    for name, ports in published.items():
        for entry in ports:
            assert _port(entry, {})[0] == "127.0.0.1", (name, entry)
            assert _port(entry, {"MOPD_BIND": "0.0.0.0"})[0] == "0.0.0.0", (name, entry)
    assert _port("8080:80", {})[0] == "0.0.0.0"  # the parser sees an unbound port as public
    assert _port({"target": 80, "published": 8080}, {})[0] == "0.0.0.0"
    assert "MOPD_BIND" in (CONTAINERS / "README.md").read_text()


def test_compose_builds_point_at_dockerfiles():
    c = _compose()
    for svc in c["services"].values():
        build = svc.get("build")
        if build:
            assert (CONTAINERS / build["context"]).resolve() == ROOT
            assert (ROOT / build["dockerfile"]).is_file()


def _run_extraction(dockerfile: str) -> list[str]:
    """Run the Dockerfile's `python -c "import tomllib ..."` line against the real pyproject."""
    text = (CONTAINERS / dockerfile).read_text()
    m = re.search(r'python -c "(import tomllib;.*?)"\s*\\', text)
    assert m, f"no tomllib extraction in {dockerfile}"
    out = subprocess.run([sys.executable, "-c", m.group(1)], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_dockerfile_cpu():
    text = (CONTAINERS / "Dockerfile.cpu").read_text()
    assert re.findall(r"^FROM .*$", text, re.M) == ["FROM python:3.11-slim"]
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert "bubblewrap" in text and "pip install ." in text
    reqs = _run_extraction("Dockerfile.cpu")
    # the CPU wheel installed first must satisfy pyproject's torch range, or pip would replace it
    torch, = [Requirement(r) for r in reqs if Requirement(r).name == "torch"]
    assert torch.specifier.contains("2.13.0+cpu") and any(r.startswith("mergekit") for r in reqs)
    assert not any(r.startswith("vllm") for r in reqs)


def test_dockerfile_cuda():
    text = (CONTAINERS / "Dockerfile.cuda").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text)
    assert 'pip install ".[gpu]"' in text and "bubblewrap" in text
    reqs = _run_extraction("Dockerfile.cuda")
    assert any(r.startswith("vllm") for r in reqs)
