#!/usr/bin/env python3
"""Checks deploy/ (Dockerfiles, compose, Prometheus, Grafana) and k8s/ against the real binaries.

Usage: deploy_test.py CHECK [--bin-dir DIR]     exit 0 = pass, 1 = fail, 77 = skipped
CHECK:
  parse          every YAML/JSON file parses; dashboards, provisioning, compose, kustomizations
                 and Dockerfile COPY sources have the expected structure and existing paths
  flags          every prehoc server command line (k8s containers after the kustomize overlays,
                 compose services, Dockerfile CMDs, README.md / docs/deploy.md sh blocks) and
                 every --config JSON file is accepted by the binary
                 it is for: the flag names are in its --help, and the binary itself parses the
                 exact arguments + config (`BINARY ARGS... --help` exits 0)
  manifests      consistency: probes use the real health services ("liveness"/"readiness") on
                 the gRPC port, grace periods >= the drain deadline, scrape annotations and
                 Prometheus targets = the metrics ports, workers dial a cache-manager Service that
                 publishes not-ready addresses, advertise port = listen port, GPU overlay asks
                 for nvidia.com/gpu with --device cuda
  metric_names   every prehoc_* metric (and label) in the Prometheus rules and Grafana dashboards
                 exists in a live scrape: prehoc-cachemgr + an autoregressive and a diffusion
                 prehoc-worker on 127.0.0.1 ports chosen by the OS, driven with Generate (dense
                 and PrHS with a delta target) and Diffuse requests; also documented in
                 docs/metrics.md. Also checks the grpc.health.v1 service names live.
  promtool       promtool check config / check rules / test rules (skipped without promtool)
  prometheus_live  Debian's Prometheus with the shipped rules scrapes the live cluster: every
                 recording rule yields a number under traffic, availability alerts stay silent
                 while healthy, and fire when the workers are killed (skipped without prometheus)
  kustomize      `kubectl kustomize` renders every overlay and agrees with this script's own
                 renderer on every container (skipped without kubectl)
  runtime_libs   the Dockerfiles' runtime package list = the Debian packages that provide the
                 shared libraries the binaries link (readelf NEEDED + dpkg -S)
No network, no docker, no cluster.
"""
import argparse
import atexit
import copy
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

try:
    import yaml
except ImportError:  # exit code 77 = skipped
    print("SKIP: python3-yaml is not installed (scripts/install_deps.sh)")
    sys.exit(77)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(ROOT, "k8s")
OVERLAYS = ["cpu", "gpu"]
BINARIES = {"prehoc-cachemgr", "prehoc-worker", "prehoc"}
HEALTH_SERVICES = {"liveness", "readiness"}
SKIP = 77


class Skip(Exception):
    pass


class Failures:
    """Collects every problem of a check, so one run reports all of them."""

    def __init__(self):
        self.items = []

    def add(self, msg):
        self.items.append(msg)

    def check(self, cond, msg):
        if not cond:
            self.add(msg)
        return cond


def rel(path):
    return os.path.relpath(path, ROOT)


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def deploy_files(exts):
    out = []
    for base in (DEPLOY, K8S):
        for dirpath, _, files in os.walk(base):
            out += [os.path.join(dirpath, f) for f in files if f.endswith(exts)]
    return sorted(out)


# ------------------------------------------------------------------------------------------------
# A small kustomize: exactly the features k8s/ uses (resources, configMapGenerator with files and
# behavior merge, strategic-merge patches keyed by kind/name with lists merged by `name`,
# namespace, labels, images). `kustomize` cross-checks it against kubectl when available.

def _merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and
            all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        for p in patch:
            for i, x in enumerate(out):
                if x["name"] == p["name"]:
                    out[i] = _merge(x, p)
                    break
            else:
                out.append(copy.deepcopy(p))
        return out
    return copy.deepcopy(patch)


def render(kdir):
    """Returns the list of objects `kustomize build kdir` would produce (config maps unhashed)."""
    with open(os.path.join(kdir, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    objs = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(kdir, r))
        objs += render(p) if os.path.isdir(p) else load_yaml_docs(p)
    for gen in k.get("configMapGenerator", []):
        data = {}
        for fpath in gen.get("files", []):
            with open(os.path.join(kdir, fpath)) as f:
                data[os.path.basename(fpath)] = f.read()
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
              "data": data}
        if gen.get("behavior") == "merge":
            target = [o for o in objs if o["kind"] == "ConfigMap" and
                      o["metadata"]["name"] == gen["name"]]
            if len(target) != 1:
                raise ValueError(f"{kdir}: merge into missing ConfigMap {gen['name']}")
            target[0]["data"].update(data)
        else:
            objs.append(cm)
    for p in k.get("patches", []):
        for patch in load_yaml_docs(os.path.join(kdir, p["path"])):
            hits = [i for i, o in enumerate(objs) if o["kind"] == patch["kind"] and
                    o["metadata"]["name"] == patch["metadata"]["name"]]
            if len(hits) != 1:
                raise ValueError(f"{kdir}: patch {p['path']} matches {len(hits)} objects")
            objs[hits[0]] = _merge(objs[hits[0]], patch)
    for lab in k.get("labels", []):
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(lab["pairs"])
    if "namespace" in k:
        for o in objs:
            if o["kind"] != "Namespace":
                o["metadata"]["namespace"] = k["namespace"]
    for img in k.get("images", []):
        for o in objs:
            for c in pod_spec(o).get("containers", []) if pod_spec(o) else []:
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img.get('newTag', 'latest')}"
    return objs


def pod_spec(obj):
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def kustomize_targets():
    return [os.path.join(K8S, "base")] + [os.path.join(K8S, "overlays", o) for o in OVERLAYS]


# ------------------------------------------------------------------------------------------------
# Command lines of prehoc binaries found in the deployment files.

class CommandLine:
    """argv of a prehoc binary and where it came from; config = local path of its --config."""

    def __init__(self, where, argv, config_files):
        self.where = where
        self.argv = argv
        self.binary = os.path.basename(argv[0])
        # `prehoc serve`: the subcommand is part of the binary's identity.
        self.sub = argv[1] if self.binary == "prehoc" and len(argv) > 1 else None
        self.args = argv[2:] if self.sub else argv[1:]
        self.config_files = config_files  # container path -> local file

    def flag_values(self):
        """{flag: value} from the args (last wins), then the --config file's keys underneath."""
        vals = {}
        cfg = self.config_path()
        if cfg:
            with open(cfg) as f:
                vals.update({k: str(v) for k, v in json.load(f).items()})
        i = 0
        while i < len(self.args):
            a = self.args[i]
            if a.startswith("--"):
                name, eq, val = a[2:].partition("=")
                if not eq and i + 1 < len(self.args) and not self.args[i + 1].startswith("--"):
                    val = self.args[i + 1]
                    i += 1
                vals[name] = val
            i += 1
        return vals

    def config_path(self):
        for i, a in enumerate(self.args):
            if a.startswith("--config="):
                return self.config_files.get(a[len("--config="):])
            if a == "--config" and i + 1 < len(self.args):
                return self.config_files.get(self.args[i + 1])
        return None


def k8s_command_lines(objs, where):
    out = []
    cms = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    tmp = tempfile.mkdtemp(prefix="prehoc_deploy_cfg_")
    atexit.register(shutil.rmtree, tmp, True)
    for o in objs:
        spec = pod_spec(o)
        if not spec:
            continue
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            argv = list(c.get("command", [])) + list(c.get("args", []))
            if not argv or os.path.basename(argv[0]) not in BINARIES:
                continue
            files = {}
            for m in c.get("volumeMounts", []):
                v = volumes.get(m["name"], {})
                if "configMap" in v and v["configMap"]["name"] in cms:
                    for key, text in cms[v["configMap"]["name"]]["data"].items():
                        local = os.path.join(tmp, f"{o['metadata']['name']}-{c['name']}-{key}")
                        with open(local, "w") as f:
                            f.write(text)
                        files[os.path.join(m["mountPath"], key)] = local
            out.append(CommandLine(f"{where}: {o['kind']}/{o['metadata']['name']} "
                                   f"container {c['name']}", argv, files))
    return out


def compose():
    with open(os.path.join(DEPLOY, "docker-compose.yml")) as f:
        return yaml.safe_load(f)


def compose_command_lines():
    out = []
    for name, svc in compose()["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)
        if not cmd or os.path.basename(cmd[0]) not in BINARIES:
            continue
        files = {}
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            src = os.path.normpath(os.path.join(DEPLOY, src))
            if os.path.isdir(src):
                for fpath in glob.glob(os.path.join(src, "*")):
                    files[os.path.join(dst, os.path.basename(fpath))] = fpath
            else:
                files[dst] = src
        out.append(CommandLine(f"deploy/docker-compose.yml: service {name}", cmd, files))
    return out


def dockerfiles():
    return sorted(glob.glob(os.path.join(DEPLOY, "docker", "Dockerfile*")))


def dockerfile_instructions(path):
    """(instruction, text) pairs with continuation lines joined and comment lines dropped."""
    out, cur = [], ""
    with open(path) as f:
        for line in f:
            s = line.rstrip("\n")
            if s.lstrip().startswith("#"):
                continue
            if s.endswith("\\"):
                cur += s[:-1] + " "
                continue
            cur += s
            if cur.strip():
                word, _, rest = cur.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            cur = ""
    return [d for d in out if not d[0].startswith("#")]


def dockerfile_command_lines():
    out = []
    for path in dockerfiles():
        if path.endswith(".dockerignore"):
            continue
        for ins, text in dockerfile_instructions(path):
            if ins in ("CMD", "ENTRYPOINT"):
                argv = json.loads(text)  # exec form only: a shell form would not get SIGTERM
                if os.path.basename(argv[0]) in BINARIES:
                    out.append(CommandLine(f"{rel(path)}: {ins}", argv, {}))
    return out


def doc_command_lines():
    """Server command lines in the ```sh blocks of README.md and docs/deploy.md (continuation
    lines joined; a `docker run ... IMAGE prehoc-worker ...` counts from the binary on)."""
    out = []
    for doc in ("README.md", "docs/deploy.md"):
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        for block in re.findall(r"```sh\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split(" #")[0], comments=False) if line.strip() and \
                    not line.lstrip().startswith("#") else []
                for i, w in enumerate(words):
                    b = os.path.basename(w)
                    if w != b and not w.endswith("bin/" + b):  # e.g. kubectl's deploy/NAME
                        continue
                    if b in ("prehoc-worker", "prehoc-cachemgr") or \
                            (b == "prehoc" and words[i + 1:i + 2] == ["serve"]):
                        out.append(CommandLine(f"{doc}: `{' '.join(words[i:i + 3])} ...`",
                                               words[i:], {}))
                        break
    return out


def all_command_lines():
    out = []
    for t in kustomize_targets():
        out += k8s_command_lines(render(t), rel(t))
    return out + compose_command_lines() + dockerfile_command_lines() + doc_command_lines()


# ------------------------------------------------------------------------------------------------
# Binaries.

def bin_path(bin_dir, name):
    p = os.path.join(bin_dir, name)
    if not os.access(p, os.X_OK):
        raise Skip(f"{p} is not built (build the prehoc, prehoc-worker and prehoc-cachemgr "
                   "targets first)")
    return p


def help_flags(bin_dir, binary, sub):
    argv = [bin_path(bin_dir, binary)] + ([sub] if sub else []) + ["--help"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr}")
    flags = {}
    for m in re.finditer(r"^  --([a-z0-9][a-z0-9-]*)(?: FILE)?\n      (.*)$", r.stdout, re.M):
        default = re.search(r"\(default: (.*)\)$", m.group(2))
        flags[m.group(1)] = default.group(1) if default else None
    if not flags:
        raise AssertionError(f"no flags found in the output of {' '.join(argv)}")
    return flags


# ------------------------------------------------------------------------------------------------
# PromQL: metric names and labels.

PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "rate", "irate", "increase", "delta", "idelta",
    "deriv", "histogram_quantile", "vector", "scalar", "abs", "clamp_min", "clamp_max",
    "label_values", "label_replace", "time", "absent", "changes", "resets", "sort",
    "sort_desc", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
    "count_over_time", "last_over_time", "predict_linear", "round", "ceil", "floor", "exp",
    "ln", "log2", "log10", "sqrt", "timestamp", "inf", "nan", "le",
}
TARGET_LABELS = {"job", "instance", "namespace", "pod", "__name__"}


def strip_promql(expr):
    """The expression without string literals, Grafana variables and range selectors."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\$__\w+|\$\{?\w+\}?", "5m", expr)
    return re.sub(r"\[[^\]]*\]", "", expr)


def promql_names(expr):
    """Metric and recording-rule names referenced by `expr`."""
    s = strip_promql(expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)", s):
        w = m.group(1)
        if w.lower() in PROMQL_WORDS or re.fullmatch(r"\d+\w*", w):
            continue
        names.add(w)
    return names


def promql_labels(expr):
    """Label names used in matchers and in by/on/... clauses of `expr`."""
    s = strip_promql(expr)
    labels = set()
    for body in re.findall(r"\{([^}]*)\}", s):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
    for body in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s):
        labels |= {x.strip() for x in body.split(",") if x.strip()}
    return labels


def rule_files():
    return sorted(glob.glob(os.path.join(DEPLOY, "prometheus", "rules", "*.yml")))


def rule_exprs():
    """[(where, expr)] and {recorded name: its output labels}."""
    exprs, recorded = [], {}
    for path in rule_files():
        with open(path) as f:
            doc = yaml.safe_load(f)
        for g in doc["groups"]:
            for r in g["rules"]:
                name = r.get("record") or r.get("alert")
                exprs.append((f"{rel(path)}: {name}", r["expr"]))
                if "record" in r:
                    level = r["record"].split(":")[0]
                    recorded[r["record"]] = set(level.split("_")) if level else set()
    return exprs, recorded


def dashboard_files():
    return sorted(glob.glob(os.path.join(DEPLOY, "grafana", "dashboards", "*.json")))


def dashboard_exprs():
    out = []
    for path in dashboard_files():
        with open(path) as f:
            d = json.load(f)
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((f"{rel(path)}: panel '{p['title']}' {t['refId']}", t["expr"]))
        for v in d.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
                out.append((f"{rel(path)}: variable {v['name']}", inner.group(1) if inner else q))
    return out


def doc_exprs():
    """The PromQL of docs/metrics.md's "Useful queries" block (indented lines continue one)."""
    with open(os.path.join(ROOT, "docs", "metrics.md")) as f:
        text = f.read()
    block = re.search(r"```promql\n(.*?)```", text, re.S)
    exprs = []
    for line in block.group(1).splitlines() if block else []:
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace() and exprs:
            exprs[-1] += " " + line.strip()
        else:
            exprs.append(line.strip())
    return [(f"docs/metrics.md query {i + 1}", e) for i, e in enumerate(exprs)]


def documented_labels():
    """{metric: label set} from docs/metrics.md's tables ("–" = no labels)."""
    with open(os.path.join(ROOT, "docs", "metrics.md")) as f:
        text = f.read()
    out = {}
    for m in re.finditer(r"^\| `(prehoc_\w+)` \| (\w+) \| ([^|]*) \|", text, re.M):
        out[m.group(1)] = (m.group(2), {x.strip() for x in m.group(3).split(",")} - {"", "–", "—", "-"})
    return out


def documented_metrics():
    with open(os.path.join(ROOT, "docs", "metrics.md")) as f:
        text = f.read()
    return set(re.findall(r"^\| `(prehoc_\w+)` \|", text, re.M))


# ------------------------------------------------------------------------------------------------
# Live scrape.

class Server:
    """A prehoc binary on 127.0.0.1 with OS-chosen ports; reads its `... ready ...` line."""

    def __init__(self, argv, ready_word, log_dir, name):
        self.log = open(os.path.join(log_dir, name + ".log"), "w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.name = name
        deadline = time.time() + 60
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line or ready_word in line:
                break
        if ready_word not in line:
            self.stop()
            with open(self.log.name) as f:
                tail = "".join(f.readlines()[-20:])
            raise AssertionError(f"{name} did not start ({' '.join(argv)}):\n{tail}")
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        self.grpc = fields.get("grpc_port") or fields["grpc"].rsplit(":", 1)[1]
        self.metrics_port = int(fields["metrics_port"])

    def scrape(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as r:
            return r.read().decode()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def parse_exposition(text):
    """{family name: (type, set of label names)} from Prometheus text format."""
    types, fams = {}, {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            types[m.group(1)] = m.group(2)
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{(.*)\})?\s", line)
        if not m:
            continue
        name = m.group(1)
        labels = set(re.findall(r'(\w+)="', m.group(3) or ""))
        fam = name
        for suf in ("_bucket", "_sum", "_count"):
            if name.endswith(suf) and types.get(name[: -len(suf)]) == "histogram":
                fam = name[: -len(suf)]
        fams.setdefault(fam, (types.get(fam, "untyped"), set()))[1].update(labels)
    return fams


def series_names(fams):
    """Every series name a query may use: families, plus _bucket/_sum/_count of histograms."""
    out = {}
    for fam, (typ, labels) in fams.items():
        out[fam] = labels
        if typ == "histogram":
            out[fam + "_bucket"] = labels | {"le"}
            out[fam + "_sum"] = labels - {"le"}
            out[fam + "_count"] = labels - {"le"}
    return out


def python_stubs(tmp):
    """Generated Python stubs for prehoc.v1 and grpc.health.v1, or Skip."""
    py_ok = subprocess.run([sys.executable, "-c", "import grpc, google.protobuf"],
                           capture_output=True).returncode == 0
    plugin = shutil.which("grpc_python_plugin")
    if not py_ok or not plugin or not shutil.which("protoc"):
        raise Skip("the live scrape needs python3-grpcio, python3-protobuf and "
                   "protobuf-compiler-grpc (scripts/install_deps.sh)")
    out = os.path.join(tmp, "stubs")
    os.makedirs(out)
    # grpc.health.v1 under another module name: the installed `grpc` package owns `grpc.*`.
    health_dir = os.path.join(tmp, "health")
    os.makedirs(health_dir)
    shutil.copy(os.path.join(ROOT, "proto", "grpc", "health", "v1", "health.proto"),
                os.path.join(health_dir, "deploy_health.proto"))
    for inc, files in ((os.path.join(ROOT, "proto"), ["prehoc/v1/common.proto",
                                                       "prehoc/v1/inference.proto"]),
                       (health_dir, ["deploy_health.proto"])):
        subprocess.run(["protoc", "-I", inc, f"--python_out={out}", f"--grpc_python_out={out}",
                        f"--plugin=protoc-gen-grpc_python={plugin}"] +
                       [os.path.join(inc, f) for f in files], check=True)
    sys.path.insert(0, out)
    sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
    os.environ["PREHOC_PY_STUBS"] = out


class LiveCluster:
    """prehoc-cachemgr + a prehoc-worker on models/prehoc-code-ar + one on models/prehoc-code-dlm,
    on 127.0.0.1 with OS-chosen ports (heartbeat 200 ms). Use as a context manager."""

    def __init__(self, bin_dir):
        self.bin_dir = bin_dir
        self.tmp = tempfile.mkdtemp(prefix="prehoc_deploy_live_")
        self.servers = []

    def __enter__(self):
        try:
            python_stubs(self.tmp)
            from prehoc_client import PrehocClient
            self.cm = self._start("cachemgr", [
                bin_path(self.bin_dir, "prehoc-cachemgr"), "--listen=127.0.0.1:0",
                "--metrics-listen=127.0.0.1:0", "--heartbeat-interval-ms=200",
                "--drain-timeout-s=0", "--log-level=warning"], "prehoc-cachemgr ready")
            common = ["--listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0", "--threads=1",
                      "--kv-cache-mb=64", f"--cachemgr=127.0.0.1:{self.cm.grpc}",
                      "--drain-timeout-s=0", "--device=cpu", "--log-level=warning"]
            self.workers = [
                self._start(f"worker-{m}", [bin_path(self.bin_dir, "prehoc-worker"),
                                            "--model=" + os.path.join(ROOT, "models",
                                                                      "prehoc-code-" + m),
                                            "--model-name=code-" + m] + common,
                            "prehoc-worker ready") for m in ("ar", "dlm")]
            self.client = PrehocClient(f"127.0.0.1:{self.cm.grpc}", timeout=120)
            self.wait_gauge("prehoc_cachemgr_workers_ready", 2, 30)
            return self
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise

    def _start(self, name, argv, ready_word):
        s = Server(argv, ready_word, self.tmp, name)
        self.servers.append(s)
        return s

    def __exit__(self, exc_type, exc, tb):
        for s in self.servers:
            s.stop()
        if exc_type is not None:  # failing: show what the servers said
            for s in self.servers:
                with open(s.log.name) as f:
                    print(f"--- {s.name} log (last 40 lines):\n" + "".join(f.readlines()[-40:]))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def wait_gauge(self, name, value, seconds):
        deadline = time.time() + seconds
        while True:
            m = re.search(rf"^{name} (\S+)", self.cm.scrape(), re.M)
            if m and float(m.group(1)) == value:
                return
            if time.time() > deadline:
                raise AssertionError(f"{name} did not reach {value} in {seconds} s")
            time.sleep(0.1)

    def traffic(self):
        """Generate (dense; PrHS with delta* = 0.01 at a 701-token prompt: refreshes, telemetry,
        cache-manager plans) and Diffuse (spa) through the cache manager."""
        prompt = [256] + [(i * 37 + 11) % 256 for i in range(700)]
        self.client.generate_all(model="code-ar", token_ids=prompt[:40], max_tokens=8)
        self.client.generate_all(model="code-ar", token_ids=prompt, max_tokens=24, policy="prhs",
                                 target_delta=0.01)
        self.client.diffuse_all(model="code-dlm", token_ids=prompt[:16], gen_length=8,
                                block_length=4, steps=8, cache="spa")

    def check_health(self, fail):
        """The health service names the probes use answer on every server."""
        import grpc
        import deploy_health_pb2 as health_pb2
        import deploy_health_pb2_grpc as health_pb2_grpc
        for s in self.servers:
            stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{s.grpc}"))
            for svc in sorted(HEALTH_SERVICES):
                try:
                    st = stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=10).status
                except grpc.RpcError as e:
                    fail.add(f"live: {s.name} health service '{svc}': {e.code().name}")
                    continue
                fail.check(st == health_pb2.HealthCheckResponse.SERVING,
                           f"live: {s.name} {svc} is {st}, not SERVING")


def live_registry(bin_dir, fail):
    """{series name: label names} of all three servers' scrapes after traffic."""
    with LiveCluster(bin_dir) as c:
        c.check_health(fail)
        c.traffic()
        # Telemetry reaches the cache manager after the workers' next heartbeats.
        wanted = {"prehoc_cachemgr_sparsity_delta_observed",
                  "prehoc_cachemgr_sparsity_kept_fraction",
                  "prehoc_cachemgr_sparsity_refreshes_total"}
        deadline = time.time() + 20
        while time.time() < deadline and not wanted <= set(parse_exposition(c.cm.scrape())):
            time.sleep(0.2)
        registry = {}
        for s in c.servers:
            for name, labels in series_names(parse_exposition(s.scrape())).items():
                registry.setdefault(name, set()).update(labels)
        return registry


# ------------------------------------------------------------------------------------------------
# Checks.

def check_parse(args, fail):
    for path in deploy_files((".yml", ".yaml")):
        try:
            docs = load_yaml_docs(path)
            fail.check(docs, f"{rel(path)}: empty YAML")
        except yaml.YAMLError as e:
            fail.add(f"{rel(path)}: {e}")
    for path in deploy_files((".json",)):
        try:
            with open(path) as f:
                json.load(f)
        except ValueError as e:
            fail.add(f"{rel(path)}: {e}")
    if fail.items:
        return
    # Dashboards: unique uids and panel ids, every target has an expr, grid inside 24 columns.
    uids = set()
    for path in dashboard_files():
        with open(path) as f:
            d = json.load(f)
        fail.check(d.get("uid") and d["uid"] not in uids, f"{rel(path)}: missing/duplicate uid")
        uids.add(d.get("uid"))
        ids = [p["id"] for p in d["panels"]]
        fail.check(len(ids) == len(set(ids)), f"{rel(path)}: duplicate panel ids")
        for p in d["panels"]:
            g = p["gridPos"]
            fail.check(g["x"] + g["w"] <= 24, f"{rel(path)}: panel '{p['title']}' overflows")
            if p["type"] != "row":
                fail.check(p.get("targets") and all(t.get("expr") for t in p["targets"]),
                           f"{rel(path)}: panel '{p['title']}' has no query")
    fail.check(len(dashboard_files()) >= 2, "expected the serving and the DLM dashboards")
    prov = os.path.join(DEPLOY, "grafana", "provisioning")
    with open(os.path.join(prov, "dashboards", "prehoc.yml")) as f:
        dash_prov = yaml.safe_load(f)
    with open(os.path.join(prov, "datasources", "prometheus.yml")) as f:
        ds_prov = yaml.safe_load(f)
    fail.check(ds_prov["datasources"][0]["type"] == "prometheus", "datasource is not prometheus")
    # Compose mounts: every host path exists; Grafana's provider path is where the dashboards are.
    c = compose()
    for want in ("cachemgr", "worker-0", "worker-1", "prometheus", "grafana"):
        fail.check(want in c["services"], f"docker-compose.yml: no service {want}")
    mounts = {}
    for name, svc in c["services"].items():
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            if src.startswith((".", "/")):
                fail.check(os.path.exists(os.path.normpath(os.path.join(DEPLOY, src))),
                           f"docker-compose.yml: {name} mounts missing {src}")
                mounts[dst] = os.path.normpath(os.path.join(DEPLOY, src))
        b = svc.get("build")
        if b:
            fail.check(os.path.exists(os.path.join(DEPLOY, b["context"], b["dockerfile"])),
                       f"docker-compose.yml: {name} builds a missing Dockerfile")
    path = dash_prov["providers"][0]["options"]["path"]
    fail.check(mounts.get(path) == os.path.join(DEPLOY, "grafana", "dashboards"),
               f"grafana provider path {path} is not the mounted deploy/grafana/dashboards")
    home = c["services"]["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        fail.check(os.path.exists(os.path.join(DEPLOY, "grafana", "dashboards",
                                               os.path.relpath(home, path))),
                   f"grafana home dashboard {home} does not exist")
    # Prometheus: rule_files glob = where compose mounts the rules.
    with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    for rf in prom["rule_files"]:
        d = os.path.dirname(rf)
        fail.check(mounts.get(d) and glob.glob(os.path.join(mounts[d], os.path.basename(rf))),
                   f"prometheus.yml rule_files {rf} match nothing in the compose mounts")
    # Kustomizations: every referenced file exists and renders.
    for t in kustomize_targets():
        try:
            objs = render(t)
            fail.check(any(o["kind"] == "Deployment" for o in objs), f"{rel(t)}: no Deployment")
        except (OSError, KeyError, ValueError) as e:
            fail.add(f"{rel(t)}: {e}")
    # Dockerfiles: COPY sources (from the build context = repository root) exist.
    for path in dockerfiles():
        if path.endswith(".dockerignore"):
            continue
        for ins, text in dockerfile_instructions(path):
            if ins == "COPY" and "--from=" not in text:
                parts = [p for p in text.split() if not p.startswith("--")]
                for src in parts[:-1]:
                    fail.check(os.path.exists(os.path.join(ROOT, src)),
                               f"{rel(path)}: COPY source {src} does not exist")
        fail.check(os.path.exists(path + ".dockerignore"), f"{rel(path)}: no .dockerignore")


def check_flags(args, fail):
    lines = all_command_lines()
    seen = {(cl.binary, cl.sub) for cl in lines}
    for want in (("prehoc-cachemgr", None), ("prehoc-worker", None)):
        fail.check(want in seen, f"no {want[0]} command line found in the deployment files")
    helps = {}
    for cl in lines:
        key = (cl.binary, cl.sub)
        if key not in helps:
            helps[key] = help_flags(args.bin_dir, cl.binary, cl.sub)
        known = helps[key]
        for a in cl.args:
            if not a.startswith("--"):
                continue
            name = a[2:].split("=", 1)[0]
            bool_neg = name.startswith("no-") and known.get(name[3:]) in ("true", "false")
            fail.check(name in known or name == "config" or bool_neg,
                       f"{cl.where}: {cl.binary} has no flag --{name}")
        cfg = cl.config_path()
        has_cfg = any(a.startswith("--config") for a in cl.args)
        if has_cfg and fail.check(cfg and os.path.exists(cfg),
                                  f"{cl.where}: --config file is not provided by any mount"):
            with open(cfg) as f:
                for key in json.load(f):
                    fail.check(key in known, f"{cl.where}: config key '{key}' of {cfg} is not a "
                                             f"flag of {cl.binary}")
        # The binary parses these exact arguments (values included) with --help appended.
        argv = [bin_path(args.bin_dir, cl.binary)] + ([cl.sub] if cl.sub else [])
        for a in cl.args:
            if a.startswith("--config="):
                a = "--config=" + (cfg or a[len("--config="):])
            argv.append(a)
        r = subprocess.run(argv + ["--help"], capture_output=True, text=True, timeout=60)
        fail.check(r.returncode == 0, f"{cl.where}: `{cl.binary}` rejects its arguments: "
                                      f"{r.stderr.strip().splitlines()[:1]}")
    # The flags docs/services.md and docs/metrics.md name exist in some prehoc binary's --help.
    known = {"config", "help"}
    for binary, sub in [("prehoc-worker", None), ("prehoc-cachemgr", None)] + \
            [("prehoc", c) for c in ("generate", "eval", "diffuse", "serve", "loadgen")]:
        argv = [bin_path(args.bin_dir, binary)] + ([sub] if sub else []) + ["--help"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
        known |= set(re.findall(r"^\s+--([a-z][a-z0-9-]*)", out, re.M))
    for doc in ("docs/services.md", "docs/metrics.md"):
        with open(os.path.join(ROOT, doc)) as f:
            for flag in sorted(set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]+)", f.read()))):
                fail.check(flag in known or (flag.startswith("no-") and flag[3:] in known),
                           f"{doc} names --{flag}, which no prehoc binary has")
    print(f"checked {len(lines)} command lines: " + ", ".join(cl.where for cl in lines))


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def check_manifests(args, fail):
    for t in kustomize_targets():
        objs = render(t)
        where = rel(t)
        services = [o for o in objs if o["kind"] == "Service"]
        lines = {cl.where.split("container ")[-1]: cl for cl in k8s_command_lines(objs, where)}
        for o in objs:
            spec = pod_spec(o)
            if not spec:
                continue
            pod_labels = o["spec"]["template"]["metadata"]["labels"]
            ann = o["spec"]["template"]["metadata"].get("annotations", {})
            for c in spec["containers"]:
                cl = lines.get(c["name"])
                if not cl:
                    continue
                w = f"{where}: {o['metadata']['name']}/{c['name']}"
                vals = cl.flag_values()
                fail.check("listen" in vals and "metrics-listen" in vals,
                           f"{w}: --listen / --metrics-listen not set explicitly")
                grpc_port = port_of(vals.get("listen", ":0"))
                metrics_port = port_of(vals.get("metrics-listen", ":0"))
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                fail.check(ports.get("grpc") == grpc_port, f"{w}: port grpc != --listen port")
                fail.check(ports.get("metrics") == metrics_port,
                           f"{w}: port metrics != --metrics-listen port")
                fail.check(ann.get("prometheus.io/scrape") == "true" and
                           ann.get("prometheus.io/port") == str(metrics_port) and
                           ann.get("prometheus.io/path") == "/metrics",
                           f"{w}: prometheus.io annotations do not point at {metrics_port}/metrics")
                for probe, svc in (("livenessProbe", "liveness"), ("readinessProbe", "readiness"),
                                   ("startupProbe", "liveness")):
                    p = c.get(probe)
                    if probe == "startupProbe" and p is None:
                        continue
                    fail.check(p and p.get("grpc", {}).get("service") == svc and
                               p["grpc"].get("port") in (grpc_port, "grpc"),
                               f"{w}: {probe} is not grpc service '{svc}' on port {grpc_port}")
                drain = float(vals.get("drain-timeout-s", "30"))  # 30 = the binaries' default
                grace = spec.get("terminationGracePeriodSeconds", 30)
                fail.check(grace >= drain + 5, f"{w}: terminationGracePeriodSeconds {grace} < "
                                               f"--drain-timeout-s {drain} + 5")
                fail.check(c.get("resources", {}).get("requests", {}).get("cpu") and
                           c["resources"]["requests"].get("memory"),
                           f"{w}: no cpu/memory requests")
                fail.check(spec.get("securityContext", {}).get("runAsNonRoot") is True,
                           f"{w}: not runAsNonRoot")
                threads = int(vals.get("threads", "0"))
                fail.check(cl.binary != "prehoc-worker" or threads > 0, f"{w}: --threads 0 counts the node's cores, not the "
                                        "container's")
                if cl.binary == "prehoc-worker":
                    cm_host, cm_port = vals["cachemgr"].rsplit(":", 1)
                    svc = [s for s in services if s["metadata"]["name"] == cm_host.split(".")[0]]
                    if fail.check(len(svc) == 1, f"{w}: --cachemgr {cm_host} is no Service"):
                        s = svc[0]
                        fail.check(s["spec"].get("publishNotReadyAddresses") is True,
                                   f"{w}: --cachemgr Service must publish not-ready addresses "
                                   "(the cache manager is ready only once a worker registered)")
                        fail.check(int(cm_port) in [p["port"] for p in s["spec"]["ports"]],
                                   f"{w}: --cachemgr port {cm_port} not on Service {cm_host}")
                        sel = s["spec"]["selector"]
                        targets = [x for x in objs if pod_spec(x) and sel.items() <=
                                   x["spec"]["template"]["metadata"]["labels"].items()]
                        fail.check(len(targets) == 1 and
                                   targets[0]["metadata"]["name"] == "prehoc-cachemgr",
                                   f"{w}: Service {cm_host} does not select the cache manager")
                    adv = vals.get("advertise-address", "")
                    fail.check(adv.endswith(f":{grpc_port}") and "$(POD_IP)" in adv,
                               f"{w}: --advertise-address must be $(POD_IP):{grpc_port}")
                    env = {e["name"] for e in c.get("env", [])}
                    fail.check("POD_IP" in env, f"{w}: POD_IP env missing for $(POD_IP)")
                    gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                    if t.endswith("gpu"):
                        fail.check(gpus == 1 and vals.get("device") == "cuda",
                                   f"{w}: GPU overlay needs nvidia.com/gpu: 1 and --device cuda")
                        fail.check("cuda" in c["image"], f"{w}: GPU worker image {c['image']}")
                    else:
                        fail.check(gpus is None, f"{w}: asks for a GPU outside the gpu overlay")
                if cl.binary == "prehoc-cachemgr":
                    fail.check(o["spec"].get("replicas") == 1 and
                               o["spec"].get("strategy", {}).get("type") == "Recreate",
                               f"{w}: the cache manager must be 1 replica with Recreate")
                    front = [s for s in services if s["spec"]["selector"].items() <=
                             pod_labels.items() and not s["spec"].get("publishNotReadyAddresses")]
                    fail.check(any(grpc_port in [p["port"] for p in s["spec"]["ports"]]
                                   for s in front),
                               f"{w}: no client Service (ready endpoints only) on {grpc_port}")
    # Compose: grace >= drain, Prometheus targets = the services' metrics ports.
    c = compose()
    with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    targets = {t for sc in prom["scrape_configs"] for s in sc["static_configs"]
               for t in s["targets"]}
    jobs = {sc["job_name"] for sc in prom["scrape_configs"]}
    fail.check(jobs == {"prehoc-cachemgr", "prehoc-worker"},
               f"prometheus.yml jobs {jobs}: the alert rules expect prehoc-cachemgr/prehoc-worker")
    for cl in compose_command_lines():
        svc_name = cl.where.rsplit(" ", 1)[1]
        vals = cl.flag_values()
        grace = c["services"][svc_name].get("stop_grace_period", "10s")
        fail.check(int(grace.rstrip("s")) >= float(vals.get("drain-timeout-s", "30")) + 5,
                   f"{cl.where}: stop_grace_period {grace} < drain + 5 s")
        fail.check(f"{svc_name}:{port_of(vals['metrics-listen'])}" in targets,
                   f"{cl.where}: not scraped by deploy/prometheus/prometheus.yml")
        if cl.binary == "prehoc-worker":
            fail.check(vals.get("advertise-address") == f"{svc_name}:{port_of(vals['listen'])}",
                       f"{cl.where}: --advertise-address must be {svc_name}:<listen port>")
            cm_host = vals["cachemgr"].rsplit(":", 1)[0]
            fail.check(cm_host in c["services"], f"{cl.where}: --cachemgr {cm_host} unknown")
    # The k8s Prometheus config names jobs after the component label the manifests carry.
    comps = {o["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
             for o in render(os.path.join(K8S, "base")) if pod_spec(o)}
    fail.check({f"prehoc-{x}" for x in comps} == jobs,
               f"k8s components {comps} do not give the jobs {jobs}")


def check_metric_names(args, fail):
    rule_list, recorded = rule_exprs()
    exprs = rule_list + dashboard_exprs() + doc_exprs()
    fail.check(len(doc_exprs()) >= 5, "no queries parsed from docs/metrics.md")
    documented = documented_metrics()
    fail.check(len(documented) > 50, f"only {len(documented)} metrics parsed from docs/metrics.md")
    used = {}
    for where, e in exprs:
        for n in promql_names(e):
            used.setdefault(n, []).append(where)
    for n, wheres in sorted(used.items()):
        if ":" in n:
            fail.check(n in recorded, f"{wheres[0]}: recording rule {n} is not defined")
        elif not n.startswith("prehoc_") and n != "up":
            fail.add(f"{wheres[0]}: '{n}' is not a prehoc metric")
    base = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used if n.startswith("prehoc_")}
    for n in sorted(base):
        fail.check(n in documented, f"{n} (used in {used.get(n, used.get(n + '_bucket', ['?']))[0]})"
                                    " is not documented in docs/metrics.md")
    registry = live_registry(args.bin_dir, fail)
    print(f"live scrape: {len(registry)} series names from prehoc-cachemgr and two workers")
    for n, wheres in sorted(used.items()):
        if n.startswith("prehoc_"):
            fail.check(n in registry, f"{wheres[0]}: {n} is not exported by the binaries "
                                      f"(live scrape)")
    # Documented metrics that the live registry lacks: docs/metrics.md is out of date (only
    # names the traffic above produces; all of them are produced).
    for n in sorted(documented - {re.sub(r"_(bucket|sum|count)$", "", x) for x in registry}):
        fail.add(f"docs/metrics.md documents {n}, the live scrape has no such metric")
    # docs/metrics.md's type and label columns = what the binaries export.
    for n, (typ, labels) in sorted(documented_labels().items()):
        live = registry.get(n + "_count" if typ == "histogram" else n)
        if live is None:
            fail.add(f"docs/metrics.md: {n} is a {typ} there, not in the live scrape")
            continue
        fail.check(typ != "counter" or n.endswith("_total"), f"docs/metrics.md: counter {n}")
        fail.check(live == labels, f"docs/metrics.md: {n} labels {sorted(labels)}, live "
                                   f"{sorted(live)}")
    # Labels: each label used must exist on one of the expression's metrics.
    for where, e in exprs:
        names = promql_names(e)
        have = set(TARGET_LABELS)
        for n in names:
            have |= registry.get(n, set()) | recorded.get(n, set())
            if n in recorded:
                have.add("le")
        for lab in promql_labels(e) - have:
            fail.add(f"{where}: label '{lab}' is on none of {sorted(names)}")
    print(f"{len(used)} names used by {len(exprs)} rule, dashboard and docs/metrics.md "
          "expressions")


def check_promtool(args, fail):
    promtool = shutil.which("promtool")
    if not promtool:
        raise Skip("promtool not found (Debian's `prometheus` package ships it: "
                   "scripts/install_deps.sh)")

    def run(*a):
        r = subprocess.run([promtool, *a], capture_output=True, text=True, timeout=120)
        return r.returncode, (r.stdout + r.stderr).strip()

    rc, out = run("check", "rules", *rule_files())
    fail.check(rc == 0, f"promtool check rules:\n{out}")
    rc, out = run("test", "rules", os.path.join(DEPLOY, "prometheus", "tests",
                                                "prehoc-rules.test.yml"))
    fail.check(rc == 0, f"promtool test rules:\n{out}")
    for cfg in sorted(glob.glob(os.path.join(DEPLOY, "prometheus", "*.yml"))):
        # Load the repository's rules through the config: rewrite the container rule path.
        with open(cfg) as f:
            doc = yaml.safe_load(f)
        doc["rule_files"] = [os.path.join(DEPLOY, "prometheus", "rules", os.path.basename(r))
                             for r in doc.get("rule_files", [])]
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
            yaml.safe_dump(doc, f)
        rc, out = run("check", "config", f.name)
        os.unlink(f.name)
        if rc != 0 and "kubernetes_sd_configs not found" in out:
            # Debian builds Prometheus without Kubernetes service discovery.
            print(f"SKIP {rel(cfg)}: this promtool has no kubernetes_sd_configs ({out.splitlines()[-1]})")
            continue
        fail.check(rc == 0 and "SUCCESS" in out, f"promtool check config {rel(cfg)}:\n{out}")
    # Every dashboard query is valid PromQL: wrap them as recording rules and check those.
    groups = [{"name": "dashboards", "rules": []}]
    for i, (where, e) in enumerate(dashboard_exprs() + doc_exprs()):
        if "label_values" in e:
            continue
        e = re.sub(r"\$__rate_interval|\$__interval", "5m", e)
        e = re.sub(r"\$\{?(\w+)\}?", ".*", e)
        groups[0]["rules"].append({"record": f"dashboard:query_{i}", "expr": e})
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump({"groups": groups}, f)
    rc, out = run("check", "rules", f.name)
    os.unlink(f.name)
    fail.check(rc == 0, f"dashboard queries are not valid PromQL:\n{out}")
    print(f"promtool: rules, rule unit tests, configs and {len(groups[0]['rules'])} dashboard "
          "and docs/metrics.md queries checked")


def _normalized(x):
    """`x` with lists of named objects sorted by name (strategic merge may reorder them)."""
    if isinstance(x, dict):
        return {k: _normalized(v) for k, v in x.items()}
    if isinstance(x, list):
        items = [_normalized(v) for v in x]
        if all(isinstance(v, dict) and "name" in v for v in items):
            items.sort(key=lambda v: v["name"])
        return items
    return x


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prom_query(port, promql):
    """The result vector of an instant query ([] on any error)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
    except (OSError, ValueError):
        return []
    return body.get("data", {}).get("result", []) if body.get("status") == "success" else []


def check_prometheus_live(args, fail):
    """Debian's Prometheus loads deploy/prometheus/rules/ and scrapes a live cluster: every
    recording rule yields a number under traffic, the availability alerts stay silent while the
    cluster is healthy, and fire when the workers die."""
    prometheus = shutil.which("prometheus")
    if not prometheus:
        raise Skip("no prometheus binary (Debian's `prometheus` package: scripts/install_deps.sh)")
    with LiveCluster(args.bin_dir) as c:
        d = os.path.join(c.tmp, "prom")
        os.makedirs(os.path.join(d, "rules"))
        for path in rule_files():  # the rules as shipped, evaluated every 500 ms here
            with open(path) as f:
                doc = yaml.safe_load(f)
            for g in doc["groups"]:
                g.pop("interval", None)
            with open(os.path.join(d, "rules", os.path.basename(path)), "w") as f:
                yaml.safe_dump(doc, f)
        # The shipped compose config with its targets replaced by the live ports.
        with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
            cfg = yaml.safe_load(f)
        cfg["global"].update(scrape_interval="200ms", scrape_timeout="200ms",
                             evaluation_interval="500ms")
        cfg["rule_files"] = [os.path.join(d, "rules", "*.yml")]
        ports = {"prehoc-cachemgr": [c.cm.metrics_port],
                 "prehoc-worker": [w.metrics_port for w in c.workers]}
        for sc in cfg["scrape_configs"]:
            sc["static_configs"] = [{"targets": [f"127.0.0.1:{p}" for p in ports[sc["job_name"]]]}]
        with open(os.path.join(d, "prometheus.yml"), "w") as f:
            yaml.safe_dump(cfg, f)
        port = free_port()
        log = open(os.path.join(d, "prometheus.log"), "w")
        prom = subprocess.Popen([prometheus, f"--config.file={d}/prometheus.yml",
                                 f"--storage.tsdb.path={d}/data",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            def poll(promql, ok, seconds=30):
                deadline = time.time() + seconds
                while True:
                    res = prom_query(port, promql)
                    if ok(res) or time.time() > deadline:
                        return res
                    time.sleep(0.2)

            up = poll('sum(up{job=~"prehoc-.*"})',
                      lambda r: r and float(r[0]["value"][1]) == 3, 60)
            if not fail.check(up and float(up[0]["value"][1]) == 3,
                              f"Prometheus did not scrape the 3 targets: {up}"):
                return
            time.sleep(0.5)  # one more scrape of the idle counters, then traffic
            # Twice: the cache manager creates a (model, policy, outcome) series at its first
            # request, and rate() does not count a series' first value (docs/metrics.md).
            c.traffic()
            c.traffic()
            recorded = sorted(rule_exprs()[1])
            numeric = lambda r: any(x["value"][1] not in ("NaN", "+Inf", "-Inf") for x in r)
            for name in recorded:
                res = poll(name, numeric, 30)
                fail.check(numeric(res), f"recording rule {name} has no numeric sample under "
                                         f"live traffic: {res}")
            target = poll('model_policy:prehoc_sparsity_delta_target:max{model="code-ar",'
                          'policy="prhs"}', numeric, 5)
            fail.check(target and abs(float(target[0]["value"][1]) - 0.01) < 1e-6,
                       f"delta target of the PrHS request: {target}")
            # Every dashboard query shows data under this traffic (variables = All).
            empty = []
            for where, e in dashboard_exprs():
                if where.split(": ")[-1].startswith("variable"):
                    continue
                e = re.sub(r"\$__rate_interval|\$__interval", "1m", e)
                e = re.sub(r"\$\{?(\w+)\}?", ".*", e)
                if not poll(e, bool, 10 if empty else 20):
                    empty.append(where)
            fail.check(not empty, "dashboard queries without data under live traffic:\n    " +
                       "\n    ".join(empty))
            availability = ["PrehocTargetDown", "PrehocNoReadyWorker",
                            "PrehocWorkerBackendUnhealthy", "PrehocWorkerDeclaredDead",
                            "PrehocPlanStreamDisconnected", "PrehocRequestFailureRatioHigh"]
            sel = "|".join(availability)
            time.sleep(1.5)  # a few rule evaluations on the healthy cluster
            quiet = prom_query(port, f'ALERTS{{alertname=~"{sel}"}}')
            fail.check(not quiet, "alerts on a healthy cluster: " +
                       ", ".join(a["metric"]["alertname"] for a in quiet))
            # Kill both workers: the cache manager declares them dead after 2 missed heartbeats.
            for w in c.workers:
                w.proc.kill()
            for alert, state in (("PrehocWorkerDeclaredDead", "firing"),
                                 ("PrehocNoReadyWorker", "pending"),
                                 ("PrehocTargetDown", "pending")):
                res = poll(f'ALERTS{{alertname="{alert}",alertstate="{state}"}}', bool, 30)
                fail.check(res, f"{alert} is not {state} after the workers died")
            down = prom_query(port, 'ALERTS{alertname="PrehocTargetDown"}')
            fail.check(sorted(a["metric"]["job"] for a in down) == ["prehoc-worker"] * 2,
                       f"PrehocTargetDown should name the two workers: {down}")
            print(f"Prometheus {prometheus}: {len(recorded)} recording rules numeric and every "
                  "dashboard query with data under traffic; availability alerts silent while "
                  "healthy; DeclaredDead firing, "
                  "NoReadyWorker and TargetDown pending after killing the workers")
        finally:
            prom.terminate()
            prom.wait(timeout=30)
            log.close()
            if fail.items:
                with open(log.name) as f:
                    print("--- prometheus log (last 30 lines):\n" + "".join(f.readlines()[-30:]))


def check_kustomize(args, fail):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        raise Skip("kubectl not found: the overlays were checked with this script's renderer "
                   "only (the parse/flags/manifests checks)")
    for t in kustomize_targets():
        r = subprocess.run([kubectl, "kustomize", t], capture_output=True, text=True, timeout=120)
        if not fail.check(r.returncode == 0, f"kubectl kustomize {rel(t)}: {r.stderr}"):
            continue
        theirs = [o for o in yaml.safe_load_all(r.stdout) if o]
        ours = render(t)
        # ConfigMaps from a generator carry kustomize's content hash: name-0123456789.
        key = lambda o: (o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])
                         if o["kind"] == "ConfigMap" else o["metadata"]["name"])
        fail.check(sorted(map(key, theirs)) == sorted(map(key, ours)),
                   f"{rel(t)}: objects differ: {sorted(map(key, theirs))} vs {sorted(map(key, ours))}")
        by_key = {key(o): o for o in ours}
        for o in theirs:
            mine = by_key.get(key(o))
            if not mine:
                continue
            if o["kind"] == "ConfigMap":
                fail.check(o["data"] == mine["data"], f"{rel(t)}: ConfigMap data differs")
            if o["kind"] != "ConfigMap":
                a, b = _normalized(o.get("spec")), _normalized(mine.get("spec"))
                for x in (a, b):  # generated names carry kustomize's hash suffix
                    for v in (x.get("template", {}).get("spec", {}).get("volumes", [])
                              if x else []):
                        if "configMap" in v:
                            v["configMap"]["name"] = "prehoc-config"
                fail.check(a == b, f"{rel(t)}: {o['kind']}/{o['metadata']['name']} spec differs "
                                   "from kubectl kustomize")
                fail.check(o["metadata"].get("namespace") == mine["metadata"].get("namespace"),
                           f"{rel(t)}: {o['kind']}/{o['metadata']['name']} namespace differs")
    print("kubectl kustomize rendered " + ", ".join(rel(t) for t in kustomize_targets()))


def runtime_block(path):
    with open(path) as f:
        text = f.read()
    m = re.search(r"# BEGIN runtime-packages\n(.*?)# END runtime-packages", text, re.S)
    if not m:
        raise AssertionError(f"{rel(path)}: no '# BEGIN runtime-packages' block")
    return set(m.group(1).replace("\\", " ").split())


def check_runtime_libs(args, fail):
    if not shutil.which("dpkg") or not shutil.which("readelf"):
        raise Skip("needs dpkg and readelf (Debian)")
    needed = set()
    for b in ("prehoc", "prehoc-cachemgr", "prehoc-worker"):
        r = subprocess.run(["readelf", "-d", bin_path(args.bin_dir, b)], capture_output=True,
                           text=True, check=True)
        needed |= set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", r.stdout))
    # CUDA libraries come from NVIDIA's repository in Dockerfile.cuda, not from this list.
    cuda = {n for n in needed if re.match(r"lib(cublas|cublasLt|cudart|cuda)\.", n)}
    pkgs = {}
    for lib in sorted(needed - cuda):
        r = subprocess.run(["dpkg", "-S", f"*/{lib}"], capture_output=True, text=True)
        owners = {line.split(":")[0] for line in r.stdout.splitlines()
                  if re.search(r"/(usr/)?lib/[^/]+/" + re.escape(lib) + "$", line)}
        if fail.check(len(owners) >= 1, f"no Debian package provides {lib} here"):
            pkgs[lib] = sorted(owners)[0]
    want = set(pkgs.values())
    for path in dockerfiles():
        if path.endswith(".dockerignore"):
            continue
        listed = runtime_block(path)
        for lib, p in sorted(pkgs.items()):
            fail.check(p in listed, f"{rel(path)}: runtime stage lacks {p} (for {lib})")
        for p in sorted(listed - want):
            fail.add(f"{rel(path)}: runtime package {p} provides none of the linked libraries")
    print("linked libraries -> packages: " + ", ".join(f"{l}={p}" for l, p in sorted(pkgs.items())))


CHECKS = {
    "parse": check_parse,
    "flags": check_flags,
    "manifests": check_manifests,
    "metric_names": check_metric_names,
    "promtool": check_promtool,
    "prometheus_live": check_prometheus_live,
    "kustomize": check_kustomize,
    "runtime_libs": check_runtime_libs,
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("check", choices=sorted(CHECKS))
    p.add_argument("--bin-dir", default=os.path.join(ROOT, "build", "bin"))
    args = p.parse_args()
    args.bin_dir = os.path.abspath(args.bin_dir)
    fail = Failures()
    try:
        CHECKS[args.check](args, fail)
    except Skip as e:
        print(f"SKIP {args.check}: {e}")
        return SKIP
    except AssertionError as e:
        fail.add(str(e))
    if fail.items:
        print(f"FAIL {args.check}: {len(fail.items)} problem(s)")
        for m in fail.items:
            print("  - " + m)
        return 1
    print(f"PASS {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
