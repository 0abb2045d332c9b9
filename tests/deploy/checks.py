#!/usr/bin/python3
"""tests/deploy/checks.py - static checks of deploy/ (called by tests/deploy/check).

Every YAML file parses; compose.yaml, the Kubernetes manifests, the systemd unit, the Dockerfile
and outboxd.conf.example say what outboxd needs, and name only settings that exist. The settings
and their defaults come from `outboxd --help` of the binary given with --bin, so the files cannot
drift from the daemon unnoticed.

Prints one line per check: "PASS name" or "FAIL name: why". Exit 0 unless a check failed.
Usage: checks.py --bin OUTBOXD
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml  # Debian's python3-yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"

failed = 0


def report(ok, name, detail=""):
    global failed
    if not ok:
        failed += 1
    line = f"{'PASS' if ok else 'FAIL'} {name}"
    if not ok and detail:
        line += ": " + " ".join(str(detail).split())[:800]
    print(line, flush=True)


def check(name):
    """Decorator: runs fn(); an AssertionError (or any exception) is a FAIL with its message."""
    def deco(fn):
        try:
            fn()
        except AssertionError as e:
            report(False, name, e)
        except Exception as e:  # noqa: BLE001
            report(False, name, f"{type(e).__name__}: {e}")
        else:
            report(True, name)
        return fn
    return deco


# ---- the daemon's settings ---------------------------------------------------------------------

def load_settings(binary):
    """{snake_key: default or None (required/no default)} from `outboxd --help`."""
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    settings = {}
    for line in out.splitlines():
        m = re.match(r"^  --([a-z][a-z0-9-]*)(\[=[A-Z]+\])?(\s+\S+)?\s{2,}(.*)$", line)
        if not m:
            continue
        key = m.group(1).replace("-", "_")
        desc = m.group(4)
        d = re.search(r"(?:\(|; )default: (.*)\)\s*$", desc)
        settings[key] = d.group(1) if d else None
    return settings


def env_name(key):
    return "OUTBOXD_" + key.upper()


# ---- helpers -----------------------------------------------------------------------------------

def yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def parse_conf(text):
    """(active {key: value}, commented {key: value}) of a `key = value` config text."""
    active, commented = {}, {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        m = re.match(r"^#\s?([a-z_]+)\s*=\s*(.*)$", line)
        if m:
            commented.setdefault(m.group(1), []).append(m.group(2).strip())
            continue
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-z_]+)\s*=\s*(.*)$", line)
        assert m, f"not a `key = value` line: {raw!r}"
        active.setdefault(m.group(1), []).append(m.group(2).strip())
    return active, commented


# ---- checks ------------------------------------------------------------------------------------

def run(binary):
    settings = load_settings(binary)
    report(len(settings) >= 10 and "pg_url" in settings and "http_addr" in settings,
           f"outboxd --help lists the settings ({len(settings)})", sorted(settings))

    yaml_files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))

    @check(f"every YAML file in deploy/ parses ({len(yaml_files)} files)")
    def _():
        assert yaml_files, "no YAML files"
        for p in yaml_files:
            try:
                yaml_docs(p)
            except yaml.YAMLError as e:
                raise AssertionError(f"{p.relative_to(REPO)}: {e}") from None

    # -- compose.yaml
    compose = yaml_docs(DEPLOY / "compose.yaml")[0]
    svcs = compose.get("services", {})

    @check("compose: services postgres, nats, nats-setup, outboxd, prometheus")
    def _():
        missing = {"postgres", "nats", "nats-setup", "outboxd", "prometheus"} - set(svcs)
        assert not missing, f"missing {sorted(missing)}"

    @check("compose: postgres:15 with wal_level=logical, outbox.sql and the role script, healthcheck")
    def _():
        p = svcs["postgres"]
        assert str(p["image"]).startswith("postgres:15"), p["image"]
        cmd = p["command"] if isinstance(p["command"], str) else " ".join(p["command"])
        assert "wal_level=logical" in cmd, cmd
        vols = [v.split(":")[0] for v in p.get("volumes", [])]
        for host in ("../scripts/outbox.sql", "./postgres-init.sql"):
            assert host in vols, f"{host} not mounted"
            assert (DEPLOY / host).resolve().is_file(), f"{host} does not exist"
        assert "healthcheck" in p, "no healthcheck"

    @check("compose: nats 2.10 with JetStream, healthcheck on :8222/healthz")
    def _():
        n = svcs["nats"]
        assert str(n["image"]).startswith("nats:2.10"), n["image"]
        cmd = n["command"] if isinstance(n["command"], str) else " ".join(n["command"])
        assert "-js" in cmd.split() and "8222" in cmd, cmd
        test = " ".join(n["healthcheck"]["test"])
        assert "8222/healthz" in test, test
        if "alpine" not in n["image"]:
            raise AssertionError("the plain nats image has no shell or wget for the healthcheck")

    @check("compose: nats-setup adds stream OUTBOX on outbox.>, file storage, 2m duplicate window")
    def _():
        s = svcs["nats-setup"]
        assert "nats-box" in s["image"], s["image"]
        script = " ".join(s.get("entrypoint", []) + s.get("command", []))
        for want in ("stream add OUTBOX", "--subjects 'outbox.>'", "--storage file", "--dupe-window 2m"):
            assert want in script, f"{want!r} missing"
        assert s["depends_on"]["nats"]["condition"] == "service_healthy"

    @check("compose: outboxd built from deploy/Dockerfile, read-only, user 10001, waits for its dependencies")
    def _():
        o = svcs["outboxd"]
        b = o["build"]
        ctx = (DEPLOY / b["context"]).resolve()
        assert ctx == REPO, f"context {ctx}"
        assert (ctx / b["dockerfile"]).is_file(), b["dockerfile"]
        assert o.get("read_only") is True, "read_only is not true"
        assert str(o.get("user", "")).split(":")[0] == "10001", o.get("user")
        dep = o["depends_on"]
        assert dep["postgres"]["condition"] == "service_healthy"
        assert dep["nats"]["condition"] == "service_healthy"
        assert dep["nats-setup"]["condition"] == "service_completed_successfully"
        assert o.get("stop_grace_period"), "no stop_grace_period"

    @check("compose: outboxd's healthcheck is `outboxd health` in exec form (the image has no shell)")
    def _():
        test = svcs["outboxd"]["healthcheck"]["test"]
        assert test == ["CMD", "/usr/local/bin/outboxd", "health"], test

    @check("compose: outboxd's OUTBOXD_* variables are all settings (unknown ones exit 2)")
    def _():
        env = svcs["outboxd"]["environment"]
        names = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        known = {env_name(k) for k in settings}
        bad = sorted(n for n in names if n.startswith("OUTBOXD_") and n not in known)
        assert not bad, f"unknown: {bad}"
        assert "OUTBOXD_PG_URL" in names and "OUTBOXD_NATS_URL" in names

    @check("compose: prometheus mounts prometheus.yml and alerts.yml from deploy/")
    def _():
        p = svcs["prometheus"]
        assert "prom/prometheus" in p["image"], p["image"]
        vols = {v.split(":")[0]: v.split(":")[1] for v in p["volumes"]}
        assert vols.get("./prometheus.yml") == "/etc/prometheus/prometheus.yml", vols
        assert vols.get("./alerts.yml") == "/etc/prometheus/alerts.yml", vols
        for host in vols:
            assert (DEPLOY / host).is_file(), f"{host} does not exist"

    @check("prometheus.yml: loads alerts.yml, scrapes outboxd on 9847")
    def _():
        pc = yaml_docs(DEPLOY / "prometheus.yml")[0]
        assert pc.get("rule_files") == ["alerts.yml"], pc.get("rule_files")
        jobs = {j["job_name"]: j for j in pc["scrape_configs"]}
        j = jobs["outboxd"]
        targets = [t for sc in j.get("static_configs", []) for t in sc.get("targets", [])]
        dns = j.get("dns_sd_configs", [])
        ok = any(t == "outboxd:9847" for t in targets) or any(
            "outboxd" in d.get("names", []) and d.get("port") == 9847 for d in dns)
        assert ok, j
        assert j.get("metrics_path", "/metrics") == "/metrics"

    # -- Kubernetes
    kust = yaml_docs(K8S / "kustomization.yaml")[0]
    docs = {}
    for f in kust["resources"]:
        for d in yaml_docs(K8S / f):
            docs.setdefault(d["kind"], []).append(d)
    sm_docs = yaml_docs(K8S / "servicemonitor.yaml")

    @check("kubernetes: kustomization lists Deployment, ConfigMap, Secret, Service, PodDisruptionBudget")
    def _():
        for f in kust["resources"]:
            assert (K8S / f).is_file(), f"{f} missing"
        missing = {"Deployment", "ConfigMap", "Secret", "Service", "PodDisruptionBudget"} - set(docs)
        assert not missing, f"missing kinds {sorted(missing)}"
        listed = set(kust["resources"])
        for p in K8S.glob("*.yaml"):
            if p.name not in listed and p.name not in ("kustomization.yaml", "servicemonitor.yaml"):
                raise AssertionError(f"{p.name} is not in kustomization.yaml")

    @check("kubernetes: ServiceMonitor (monitoring.coreos.com/v1) scrapes the Service's metrics port")
    def _():
        sm = sm_docs[0]
        assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
        svc = docs["Service"][0]
        port_names = {p["name"] for p in svc["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in port_names, f"port {ep['port']} not in {port_names}"
            assert ep.get("path", "/metrics") == "/metrics"
        sel = sm["spec"]["selector"]["matchLabels"]
        labels = svc["metadata"].get("labels", {})
        assert all(labels.get(k) == v for k, v in sel.items()), f"{sel} does not select {labels}"

    dep = docs["Deployment"][0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    c = pod["spec"]["containers"][0]

    @check("kubernetes: Deployment with 2 replicas, selector matching its pods")
    def _():
        assert dep["spec"]["replicas"] == 2, dep["spec"]["replicas"]
        sel = dep["spec"]["selector"]["matchLabels"]
        assert all(pod_labels.get(k) == v for k, v in sel.items()), (sel, pod_labels)

    @check("kubernetes: liveness /healthz and readiness /healthz on port 9847 (not /readyz: a standby answers 503)")
    def _():
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            g = c[probe]["httpGet"]
            assert g["path"] == "/healthz", f"{probe} path {g['path']}"
            port = ports.get(g["port"], g["port"])
            assert port == 9847, f"{probe} port {port}"

    @check("kubernetes: resources requests 20m/32Mi, memory limit 64Mi")
    def _():
        r = c["resources"]
        assert r["requests"] == {"cpu": "20m", "memory": "32Mi"}, r["requests"]
        assert r["limits"]["memory"] == "64Mi", r["limits"]

    @check("kubernetes: non-root, read-only root filesystem, no capabilities, seccomp RuntimeDefault")
    def _():
        psc = pod["spec"].get("securityContext", {})
        sc = c["securityContext"]
        assert psc.get("runAsNonRoot") is True or sc.get("runAsNonRoot") is True
        assert psc.get("runAsUser", sc.get("runAsUser")) == 10001
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        seccomp = sc.get("seccompProfile") or psc.get("seccompProfile")
        assert seccomp == {"type": "RuntimeDefault"}, seccomp
        term = pod["spec"].get("terminationGracePeriodSeconds", 30)
        assert term > 5, f"terminationGracePeriodSeconds {term} not above shutdown_timeout 5s"

    @check("kubernetes: no service-link variables (OUTBOXD_METRICS_* would be unknown settings)")
    def _():
        assert pod["spec"].get("enableServiceLinks") is False
        known = {env_name(k) for k in settings}
        names = [e["name"] for e in c.get("env", [])]
        bad = [n for n in names if n.startswith("OUTBOXD_") and n not in known]
        assert not bad, f"unknown: {bad}"

    @check("kubernetes: prometheus.io annotations name port 9847 and /metrics")
    def _():
        ann = pod["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == "9847"
        assert ann.get("prometheus.io/path", "/metrics") == "/metrics"

    @check("kubernetes: OUTBOXD_PG_URL from the Secret; the ConfigMap's file mounted where --config reads it")
    def _():
        secret = docs["Secret"][0]
        env = {e["name"]: e for e in c["env"]}
        ref = env["OUTBOXD_PG_URL"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret.get("stringData", {}), f"key {ref['key']} not in the Secret"
        args = c["args"]
        conf_path = args[args.index("--config") + 1]
        cm = docs["ConfigMap"][0]
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        found = False
        for m in c["volumeMounts"]:
            v = vols[m["name"]]
            if "configMap" in v and v["configMap"]["name"] == cm["metadata"]["name"]:
                for key in cm["data"]:
                    if os.path.join(m["mountPath"], key) == conf_path:
                        found = True
        assert found, f"{conf_path} is not a key of ConfigMap {cm['metadata']['name']}"

    @check("kubernetes: the ConfigMap's config file names only settings, and no secret")
    def _():
        cm = docs["ConfigMap"][0]
        for key, text in cm["data"].items():
            active, commented = parse_conf(text)
            unknown = sorted(set(active) - set(settings))
            assert not unknown, f"{key}: unknown settings {unknown}"
            assert "pg_url" not in active, "pg_url belongs in the Secret"
            dup = [k for k, v in active.items() if len(v) > 1]
            assert not dup, f"set twice: {dup}"

    @check("kubernetes: Service and PodDisruptionBudget (minAvailable 1) select the pods")
    def _():
        svc = docs["Service"][0]
        assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert ports["metrics"]["port"] == 9847
        pdb = docs["PodDisruptionBudget"][0]
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["spec"]["minAvailable"] == 1
        assert all(pod_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())

    # -- outboxd.conf.example
    @check("outboxd.conf.example: every setting once, defaults as in --help, pg_url and nats_url set")
    def _():
        active, commented = parse_conf((DEPLOY / "outboxd.conf.example").read_text())
        keys = set(active) | set(commented)
        settings_in_file = set(settings) - {"config"}   # --config names the file itself
        assert not sorted(keys - settings_in_file), f"unknown: {sorted(keys - settings_in_file)}"
        assert not sorted(settings_in_file - keys), f"missing: {sorted(settings_in_file - keys)}"
        both = set(active) & set(commented)
        assert not both, f"both set and commented: {sorted(both)}"
        twice = [k for d in (active, commented) for k, v in d.items() if len(v) > 1]
        assert not twice, f"more than once: {twice}"
        assert set(active) == {"pg_url", "nats_url"}, f"set: {sorted(active)}"
        # A setting without a default shows an example value instead.
        wrong = {k: (v[0], settings[k]) for k, v in commented.items()
                 if settings[k] is not None and v[0] != settings[k]}
        assert not wrong, f"defaults differ from --help (file, help): {wrong}"

    # -- outboxd.service
    unit_text = (DEPLOY / "outboxd.service").read_text()
    unit = {}
    for raw in unit_text.splitlines():
        if "=" in raw and not raw.lstrip().startswith(("#", ";")):
            k, v = raw.split("=", 1)
            unit.setdefault(k.strip(), []).append(v.strip())

    @check("outboxd.service: Type=notify, ExecStart with --config, restarts except on exit 2")
    def _():
        assert unit["Type"] == ["notify"]
        assert unit["ExecStart"] == ["/usr/local/bin/outboxd run --config /etc/outboxd/outboxd.conf"]
        assert unit["Restart"] == ["on-failure"]
        prevent = " ".join(unit.get("RestartPreventExitStatus", [])).split()
        assert prevent == ["2"], f"RestartPreventExitStatus {prevent}: 2 only (3 may pass later)"
        assert unit.get("RestartSec"), "no RestartSec"

    @check("outboxd.service: TimeoutStopSec above the 5s shutdown timeout; hardening present")
    def _():
        stop = unit["TimeoutStopSec"][0]
        m = re.fullmatch(r"(\d+)s?", stop)
        assert m and int(m.group(1)) > 5, stop
        want = {
            "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
            "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
            "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
            "ProtectControlGroups": "yes", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
            "RestrictNamespaces": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
            "CapabilityBoundingSet": "",
        }
        wrong = {k: unit.get(k) for k, v in want.items() if unit.get(k) != [v]}
        assert not wrong, f"expected {want}, differ: {wrong}"
        assert "@system-service" in unit.get("SystemCallFilter", []), unit.get("SystemCallFilter")

    # -- Dockerfile (no Docker engine here: read it)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    # Join continuation lines.
    logical = re.sub(r"\\\n", " ", dockerfile)
    instr = []
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        instr.append((word.upper(), rest.strip()))

    @check("Dockerfile: build stage FROM debian:bookworm-slim, runtime stage FROM scratch")
    def _():
        froms = [r.split() for w, r in instr if w == "FROM"]
        assert len(froms) == 2, froms
        assert froms[0][0] == "debian:bookworm-slim" and froms[0][-1] == "build", froms[0]
        assert froms[1] == ["scratch"], froms[1]

    @check("Dockerfile: non-root USER 10001, EXPOSE 9847, HEALTHCHECK `outboxd health` (exec form), ENTRYPOINT/CMD")
    def _():
        users = [r for w, r in instr if w == "USER"]
        assert users and users[-1].split(":")[0] == "10001", users
        assert ("EXPOSE", "9847") in instr
        hc = [r for w, r in instr if w == "HEALTHCHECK"]
        assert len(hc) == 1, hc
        # No shell in the image: only the exec form (a JSON array) can run.
        cmd = hc[0].split(" CMD ", 1)[1].strip() if " CMD " in hc[0] else ""
        assert cmd == '["/usr/local/bin/outboxd", "health"]', hc
        assert ("ENTRYPOINT", '["/usr/local/bin/outboxd"]') in instr
        assert ("CMD", '["run"]') in instr
        runs = [r for w, r in instr if w == "RUN"]
        assert any("docker-build.sh" in r and "--image-root" in r for r in runs), \
            "the build stage must make the image's root with docker-build.sh --image-root"

    @check("Dockerfile: the runtime stage is one COPY of the build stage's image root, no RUN")
    def _():
        stage, runtime = 0, []
        for w, r in instr:
            if w == "FROM":
                stage += 1
            elif stage == 2:
                runtime.append((w, r))
        assert not [r for w, r in runtime if w in ("RUN", "ADD")], runtime
        copies = [r for w, r in runtime if w == "COPY"]
        assert len(copies) == 1 and copies[0].split()[0] == "--from=build", copies
        src = copies[0].split()[1].rstrip("/")
        assert any(w == "RUN" and "--image-root " + src in r for w, r in instr), \
            f"COPY {src}: not the folder docker-build.sh --image-root fills"

    @check("Dockerfile: every COPY source exists and passes Dockerfile.dockerignore")
    def _():
        ignore = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                  if ln.strip() and not ln.startswith("#")]
        allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
        for w, r in instr:
            if w != "COPY" or r.startswith("--from"):
                continue
            parts = [p for p in shlex.split(r) if not p.startswith("--")]
            for src in parts[:-1]:
                src = src.rstrip("/")
                assert (REPO / src).exists(), f"COPY {src}: no such file"
                assert any(src == a or src.startswith(a + "/") for a in allowed), \
                    f"COPY {src} is excluded by Dockerfile.dockerignore"

    @check("image-root: finds every library the binary needs (DT_NEEDED, recursively, as ldd), "
           "the loader and the CA bundle")
    def _():
        r = subprocess.run([sys.executable, str(DEPLOY / "image-root"), "--dry-run", "--as",
                            "/usr/local/bin/outboxd", binary, "/nonexistent"],
                           capture_output=True, text=True)
        assert r.returncode == 0, (r.stderr or r.stdout)[-600:]
        listed = {os.path.basename(line.split()[-1]) for line in r.stdout.splitlines()
                  if line.startswith("  ")}
        listed |= {os.path.basename(line.split(" -> ")[0].split()[-1]) for line in r.stdout.splitlines()
                   if " -> " in line}
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]",
                            subprocess.run(["readelf", "-d", binary], capture_output=True, text=True,
                                           check=True).stdout)
        missing = [n for n in needed if n not in listed]
        assert not missing, f"not in the image: {missing}"
        assert "ca-certificates.crt" in listed and "outboxd" in listed, r.stdout[-600:]
        interp = re.search(r"\[Requesting program interpreter: (.+?)\]",
                           subprocess.run(["readelf", "-l", binary], capture_output=True,
                                          text=True, check=True).stdout).group(1)
        assert os.path.basename(interp) in listed, f"loader {interp} missing"


def metric_checks():
    """The dashboard parses, and every outboxd_* metric it or the alert rules name is one that
    src/metrics.c or src/consumers.c serves (histogram series by their family name)."""
    import json
    import re

    served = {name for f in ("metrics.c", "consumers.c")
              for name in re.findall(r"\b(outboxd_[a-z_]+)", (REPO / "src" / f).read_text())}

    def family(name):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in served:
                return name[: -len(suffix)]
        return name

    @check("grafana-dashboard.json: parses, panels query only metrics outboxd serves")
    def _():
        dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        assert len(exprs) >= 10, f"only {len(exprs)} queries"
        used = {family(n) for e in exprs for n in re.findall(r"\b(outboxd_[a-z_]+)", e)}
        assert "outboxd_oldest_pending_age_seconds" in used
        unknown = used - served
        assert not unknown, f"not served by outboxd: {sorted(unknown)}"

    @check("alerts.yml: rules name only metrics outboxd serves")
    def _():
        text = (DEPLOY / "alerts.yml").read_text()
        used = {family(n) for n in re.findall(r"\b(outboxd_[a-z_]+)", text)}
        unknown = used - served
        assert not unknown, f"not served by outboxd: {sorted(unknown)}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    a = ap.parse_args()
    try:
        run(a.bin)
        metric_checks()
    except Exception as e:  # noqa: BLE001 - a check that could not even start
        report(False, "static checks", f"{type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
