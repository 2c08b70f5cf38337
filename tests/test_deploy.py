"""The deploy files (deploy/): they parse, the Grafana dashboard asks only for the metrics the
project exports, every ddp-* command they run exists and gets only flags of its --help, and the
pieces that refer to each other (ports, service names, mounts, datasource uid) agree.

The compose file, zmq.yaml and the systemd units run the training service: ddp-coordinator with
its service flags only, its --state-dir on a volume that outlives it, workers that stay.

Fast and offline (loopback only). Two real runs: the Slurm script with a stand-in for srun that
starts mpirun -n 2, and the systemd units' ExecStart lines (the service + 2 workers, CURVE, a job
submitted with a client key)."""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from helpers import BIN, MPIRUN, PY, free_port, load_model, one_error_line, read_json, run
from inproc import call
from zmq_helpers import Proc

yaml = pytest.importorskip("yaml", reason="PyYAML reads the deploy files: pip install pyyaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ddp-train.json"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
SBATCH = DEPLOY / "slurm" / "ddp-train.sbatch"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"

# --- the metrics of the observability spec (ddp/monitor/ exports them)
GAUGES = {
    "ddp_train_loss", "ddp_train_accuracy", "ddp_val_loss", "ddp_val_accuracy",
    "ddp_learning_rate", "ddp_grad_norm", "ddp_workers", "ddp_total_steps", "ddp_epoch",
    "ddp_worker_last_step", "ddp_worker_compute_duration_seconds",
    "ddp_last_checkpoint_timestamp_seconds", "ddp_start_time_seconds", "ddp_state",
    "ddp_build_info",
}
COUNTERS = {"ddp_train_steps_total", "ddp_train_samples_total", "ddp_rejected_messages_total",
            "ddp_worker_failures_total", "ddp_worker_joins_total", "ddp_shard_timeouts_total"}
HISTOGRAMS = {"ddp_step_duration_seconds", "ddp_compute_duration_seconds",
              "ddp_allreduce_duration_seconds"}
# pushed to a Pushgateway at the end of a run (job="ddp_train")
PUSHED = {"ddp_run_duration_seconds", "ddp_run_end_timestamp_seconds", "ddp_run_exit_code",
          "ddp_last_success_timestamp_seconds", "ddp_final_loss", "ddp_final_accuracy"}
# the training service's own (a one-job run has none of them; its jobs have the above,
# labelled job="<id>")
SERVICE_GAUGES = {"ddp_jobs", "ddp_pool_workers", "ddp_pool_idle_workers"}
SERVICE_HISTOGRAMS = {"ddp_job_queue_seconds", "ddp_job_duration_seconds"}


def histogram_series(histograms: set[str]) -> set[str]:
    return {h + suffix for h in histograms for suffix in ("_bucket", "_sum", "_count")}


SERVICE = SERVICE_GAUGES | histogram_series(SERVICE_HISTOGRAMS)
SERIES = GAUGES | COUNTERS | PUSHED | SERVICE | histogram_series(HISTOGRAMS)
# Prometheus's own series a dashboard may use
SERIES_PROMETHEUS = {"up"}

# PromQL words that look like metric names: aggregations, keywords, modifiers
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left",
    "group_right", "bool", "and", "or", "unless", "offset", "atan2", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)   # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)                                   # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                                  # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", s):
        if s[m.end():].lstrip().startswith("("):        # a function or an aggregation
            continue
        if m.group(0).lower() not in PROMQL_WORDS:
            names.add(m.group(0))
    return names


def expr_errors(exprs: list[str]) -> list[str]:
    """What is wrong with these dashboard expressions: no metric, or one the project lacks."""
    errors = []
    for expr in exprs:
        names = metric_names(expr)
        if not names:
            errors.append(f"selects no metric: {expr}")
        for name in sorted(names - SERIES - SERIES_PROMETHEUS):
            errors.append(f"{name} is not a metric of the spec: {expr}")
    return errors


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel, also those inside collapsed rows; without the rows themselves."""
    out = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def dashboard_exprs(dashboard: dict | None = None) -> list[str]:
    return [t["expr"] for p in dashboard_panels(dashboard or load_dashboard())
            for t in p.get("targets", [])]


def pushed_only(expr: str) -> bool:
    """An expression on what runs push to the Pushgateway (there only after a run ended)."""
    names = metric_names(expr)
    return bool(names) and names <= PUSHED


def service_only(expr: str) -> bool:
    """An expression on the training service's own metrics (no one-job run has them)."""
    names = metric_names(expr)
    return bool(names) and names <= SERVICE


# --- every file parses

def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


def test_the_deploy_files_are_there():
    expected = [
        "prometheus/prometheus.yml", "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/ddp.yml", "grafana/dashboards/ddp-train.json",
        "compose/docker-compose.yml", "compose/Dockerfile", "compose/prometheus.yml",
        "slurm/ddp-train.sbatch", "k8s/mpijob.yaml", "k8s/zmq.yaml",
        "systemd/ddp-coordinator.service", "systemd/ddp-worker@.service",
    ]
    missing = [name for name in expected if not (DEPLOY / name).is_file()]
    assert not missing, missing


def relative(path: Path) -> str:
    return str(path.relative_to(DEPLOY))


@pytest.mark.parametrize("path", deploy_files(".yml", ".yaml"), ids=relative)
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mappings"


@pytest.mark.parametrize("path", deploy_files(".json"), ids=relative)
def test_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


def test_bash_syntax_of_the_slurm_script():
    r = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


# --- the Grafana dashboard

def test_metric_names_of_promql():
    assert metric_names('rate(ddp_train_samples_total{job=~"$job"}[1m])') == {
        "ddp_train_samples_total"}
    assert metric_names('histogram_quantile(0.9, sum by (job, le) (rate(x_bucket[5m])))') == {
        "x_bucket"}
    assert metric_names("max by (job) (a) - on (job) group_right b offset 5m") == {"a", "b"}
    assert metric_names('time() - ddp_last_checkpoint_timestamp_seconds{state="1e3"}') == {
        "ddp_last_checkpoint_timestamp_seconds"}
    assert metric_names("1e3 * scalar(up)") == {"up"}


def test_expr_check_can_fail():
    """The names check rejects a misspelt metric, a histogram without its suffix, no metric."""
    assert expr_errors(["rate(ddp_train_samples_total[1m])", "ddp_state == 1"]) == []
    assert len(expr_errors(["rate(ddp_train_sample_total[1m])"])) == 1
    assert len(expr_errors(["rate(ddp_step_duration_seconds[1m])"])) == 1
    assert len(expr_errors(["time()"])) == 1


def test_dashboard_identity_and_datasource():
    text = DASHBOARD.read_text()
    d = json.loads(text)
    assert d["uid"] == "ddp-train" and d["title"]
    assert 36 <= d["schemaVersion"] <= 41
    assert "${DS_" not in text and "__inputs" not in d   # loads as is, no import step
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    panels = dashboard_panels(d)
    assert panels
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == source["uid"], panel["title"]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == source["uid"], var["name"]


def test_every_target_has_an_expr_of_known_metrics():
    d = load_dashboard()
    for panel in dashboard_panels(d):
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        ref_ids = [t.get("refId") for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids), panel["title"]
        for t in panel["targets"]:
            assert t.get("expr", "").strip(), f"panel {panel['title']!r}: a target without expr"
    assert expr_errors(dashboard_exprs(d)) == []
    variables = {v["name"] for v in d["templating"]["list"]}
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert inner and expr_errors([inner.group(1)]) == [], query
    for expr in dashboard_exprs(d):
        for used in re.findall(r"\$\{?(\w+)", expr):
            assert used in variables, f"${used} is not a dashboard variable: {expr}"


def test_every_metric_of_the_spec_is_on_the_dashboard():
    used = set().union(*map(metric_names, dashboard_exprs()))
    used |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert sorted((GAUGES | COUNTERS | HISTOGRAMS | PUSHED | SERVICE_GAUGES | SERVICE_HISTOGRAMS)
                  - used) == []


def selectors(expr: str) -> list[str]:
    """The label matchers of each selector of an expression, string literals kept."""
    return re.findall(r"\{((?:[^{}\"]|\"(?:[^\"\\]|\\.)*\")*)\}", expr)


def test_the_job_variable_picks_the_service_jobs():
    """$job is the service's job label, which Prometheus stores as exported_job; All is .*,
    which also matches the series of one-job runs (they have no such label). Every per-run
    selector filters by it; the service's own series (no job label) and the pushed ones
    do not."""
    d = load_dashboard()
    var = {v["name"]: v for v in d["templating"]["list"]}["job"]
    query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    assert re.fullmatch(r"label_values\(.*,\s*exported_job\)", query), query
    assert var["includeAll"] and var["multi"] and var["allValue"] == ".*"
    for expr in dashboard_exprs(d):
        for matchers in selectors(expr):
            filtered = 'exported_job=~"$job"' in matchers
            assert filtered != (pushed_only(expr) or service_only(expr)), expr


# (what the panel shows, patterns that must all match the queries of one panel)
REQUIRED_PANELS = [
    ("train and validation loss", [r"\bddp_train_loss\b", r"\bddp_val_loss\b"]),
    ("train and validation accuracy", [r"\bddp_train_accuracy\b", r"\bddp_val_accuracy\b"]),
    ("samples/s", [r"rate\(ddp_train_samples_total\{[^}]*\}\[1m\]\)"]),
    ("step time: compute and communication, p90", [
        r"rate\(ddp_compute_duration_seconds_sum\b[^/]*/"
        r"\s*rate\(ddp_compute_duration_seconds_count\b",
        r"rate\(ddp_allreduce_duration_seconds_sum\b[^/]*/"
        r"\s*rate\(ddp_allreduce_duration_seconds_count\b",
        r"histogram_quantile\(0\.9,.*ddp_step_duration_seconds_bucket"]),
    ("workers", [r"^ddp_workers\b"]),
    ("last step per worker", [r"^ddp_worker_last_step\b"]),
    ("lag per worker", [r"^max\b.*\(ddp_worker_last_step\b.*\)\s*-.*\bddp_worker_last_step\b"]),
    ("compute time per worker", [r"\bddp_worker_compute_duration_seconds\b"]),
    ("gradient norm", [r"\bddp_grad_norm\b"]),
    ("learning rate", [r"\bddp_learning_rate\b"]),
    ("rejected messages", [r"\bddp_rejected_messages_total\b"]),
    ("worker failures", [r"\bddp_worker_failures_total\b"]),
    ("shard timeouts", [r"\bddp_shard_timeouts_total\b"]),
    ("time since the last checkpoint",
     [r"time\(\)\s*-\s*ddp_last_checkpoint_timestamp_seconds\b"]),
    ("state", [r"\bddp_state\b"]),
    ("jobs by state", [r"^ddp_jobs\b"]),
    ("queue time quantiles", [r"histogram_quantile\(0\.5,.*ddp_job_queue_seconds_bucket",
                              r"histogram_quantile\(0\.9,.*ddp_job_queue_seconds_bucket"]),
    ("run time quantiles", [r"histogram_quantile\(0\.5,.*ddp_job_duration_seconds_bucket",
                            r"histogram_quantile\(0\.9,.*ddp_job_duration_seconds_bucket"]),
    ("worker pool", [r"^ddp_pool_workers\b", r"^ddp_pool_idle_workers\b"]),
]


def panel_for(panels: list[dict], patterns: list[str]) -> dict | None:
    for panel in panels:
        exprs = [t["expr"] for t in panel.get("targets", [])]
        if all(any(re.search(p, e) for e in exprs) for p in patterns):
            return panel
    return None


def test_the_dashboard_has_the_panels():
    panels = dashboard_panels(load_dashboard())
    missing = [what for what, patterns in REQUIRED_PANELS if panel_for(panels, patterns) is None]
    assert missing == []
    # and the check can fail: no panel shows the loss next to an unknown metric
    assert panel_for(panels, [r"\bddp_train_loss\b", r"\bddp_no_such_metric\b"]) is None


def test_dashboard_layout():
    d = load_dashboard()
    ids = [p["id"] for p in d["panels"]] + [p["id"] for p in dashboard_panels(d)
                                            if p not in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    taken = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        taken |= cells
    titles = [p["title"] for p in dashboard_panels(d)]
    assert len(titles) == len(set(titles)), "panel titles must be unique"


def test_grafana_provisioning_loads_the_dashboard_dir():
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/ddp.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = dict(compose_mounts(compose["services"]["grafana"]))
    assert mounts[provider["options"]["path"]] == (DEPLOY / "grafana" / "dashboards").resolve()
    assert mounts["/etc/grafana/provisioning"] == (DEPLOY / "grafana" / "provisioning").resolve()


# --- Prometheus configs

def scrape_targets(config: dict) -> dict[str, list[str]]:
    return {job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
            for job in config["scrape_configs"]}


def test_prometheus_configs():
    local = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose/prometheus.yml").read_text())
    assert scrape_targets(local) == {"ddp-train": ["localhost:9108"],
                                     "pushgateway": ["localhost:9091"]}
    assert set(scrape_targets(compose)) == {"ddp-train", "pushgateway"}
    for config in (local, compose):
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        assert jobs["pushgateway"].get("honor_labels") is True
        assert not jobs["ddp-train"].get("honor_labels", False)
        interval = config["global"]["scrape_interval"]
        assert re.fullmatch(r"\d+s", interval) and 1 <= int(interval[:-1]) <= 15


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed "
                    "(Debian package prometheus)")
@pytest.mark.parametrize("path", ["prometheus/prometheus.yml", "compose/prometheus.yml"])
def test_promtool_check_config(path):
    r = subprocess.run(["promtool", "check", "config", str(DEPLOY / path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --- the commands the deploy files run, against the real --help

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
SHELL_OPERATORS = {";", "&", "&&", "|", "||", "(", ")", ";;", "|&"}


@functools.cache
def help_text(command: str) -> str:
    """`COMMAND --help` from the parser the command runs: in this process through the entry
    `python -m ddp SUBCOMMAND` calls, else the installed script (ddp-bench). The scripts
    themselves run for real below (the Slurm script, the systemd units)."""
    from ddp.__main__ import COMMANDS

    main = COMMANDS.get(command.removeprefix("ddp-"))
    if main is not None:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("COLUMNS", "100")
            r = call(main, ["--help"])
    else:
        script = shutil.which(command, path=BIN)
        cmd = [script] if script else [PY, "-m", "ddp", command.removeprefix("ddp-")]
        r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "COLUMNS": "100"})
    assert r.returncode == 0, f"{command} --help failed:\n{r.stderr}"
    return r.stdout


@functools.cache
def options(command: str) -> tuple[dict[str, bool], bool]:
    """({option: takes a value}, has positional arguments) from the command's --help."""
    text = help_text(command)
    opts = {}
    for line in text.splitlines():
        if not re.match(r"^  -", line):
            continue
        for part in re.split(r"\s{2,}", line.strip(), maxsplit=1)[0].split(", "):
            flag, _, metavar = part.partition(" ")
            opts[flag] = bool(metavar)
    return opts, "positional arguments:" in text


def argument_errors(command: str, args: list[str]) -> list[str]:
    """Unknown options, an option without its value or with one it does not take, stray words."""
    opts, positionals = options(command)
    errors, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("$") or arg.startswith('"$'):     # a shell or systemd expansion
            pass
        elif arg.startswith("-"):
            flag, eq, _ = arg.partition("=")
            if flag not in opts:
                errors.append(f"{command} has no option {flag}")
                if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                    i += 1          # its value, whatever it is
            elif opts[flag] and not eq:
                if i + 1 == len(args) or args[i + 1].startswith("--"):
                    errors.append(f"{command} {flag} needs a value")
                i += 1
            elif not opts[flag] and eq:
                errors.append(f"{command} {flag} takes no value")
        elif not positionals:
            errors.append(f"{command}: unexpected argument {arg!r}")
        i += 1
    return errors


def command_errors(tokens: list[str], found: list[str]) -> list[str]:
    """Check each ddp-* command in a token list (up to the next shell operator); append the
    commands seen to `found`. A command's arguments are not searched for commands (a path
    such as /var/lib/ddp-train is a value)."""
    errors, i = [], 0
    while i < len(tokens):
        name = os.path.basename(tokens[i])
        i += 1
        if not re.fullmatch(r"ddp-[a-z]+", name):
            continue
        found.append(name)
        if name not in SCRIPTS:
            errors.append(f"{name} is not a command of pyproject.toml [project.scripts]")
            continue
        end = next((j for j in range(i, len(tokens)) if tokens[j] in SHELL_OPERATORS),
                   len(tokens))
        errors += argument_errors(name, tokens[i:end])
        i = end
    return errors


# The training service: what ddp-coordinator is given when it runs as the service (a job's
# training flags go to `ddp-job submit`, never to the service)
SERVICE_FLAGS = {"--bind", "--state-dir", "--max-running", "--curve-secret", "--authorized-keys",
                 "--client-keys", "--metrics-port", "--metrics-addr", "--insecure",
                 "--worker-timeout"}
# The deploy files show ddp-job in comments only (its parser comes with the service):
#   ddp-job submit|list|status|wait|cancel|fetch --connect E [--curve-secret F --server-key F]


def service_form_errors(words: list[str]) -> list[str]:
    """What keeps ddp-coordinator WORDS from being the service: a training flag (that would
    be a one-job coordinator), or no --state-dir."""
    flags = {w.partition("=")[0] for w in words[1:] if w.startswith("--")}
    errors = [f"{flag} is not a flag of the service" for flag in sorted(flags - SERVICE_FLAGS)]
    if option_value(words, "--state-dir") is None:
        errors.append("no --state-dir")
    return errors


def shell_words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined and comment lines dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return re.sub(r"\\\n", " ", "\n".join(lines)).splitlines()


def shell_script_errors(text: str, found: list[str]) -> list[str]:
    """A shell script: its ddp-* command lines, and the --options written elsewhere (argument
    variables and arrays), which must be options of the script's one ddp-* command."""
    errors, loose = [], []
    for line in logical_lines(text):
        words = shell_words(line)
        if any(re.fullmatch(r"ddp-[a-z]+", os.path.basename(w)) for w in words):
            errors += command_errors(words, found)
        else:   # quotes kept, so that "--data in VAR="--data ..." is seen; comments dropped
            lex = shlex.shlex(line, posix=False, punctuation_chars=True)
            lex.whitespace_split = True
            loose += re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(lex))
    commands = set(found)
    if loose:
        assert len(commands) == 1, f"options {loose} outside a command, and commands {commands}"
        (command,) = commands
        opts, _ = options(command)
        errors += [f"{command} has no option {flag}" for flag in loose if flag not in opts]
    return errors


def test_help_parsing():
    opts, positionals = options("ddp-train")
    assert opts["--metrics-port"] is True and opts["--insecure"] is False
    assert "--help" in opts and not positionals
    worker, _ = options("ddp-worker")
    assert "--connect" in worker and "--backend" not in worker   # named in its description only
    assert options("ddp-keygen")[1]


def test_service_checks_can_fail():
    service = shell_words("ddp-coordinator --bind tcp://0.0.0.0:5555 --insecure --state-dir /s")
    assert service_form_errors(service) == []
    assert service_form_errors(service + ["--data", "digits"]) == [
        "--data is not a flag of the service"]
    assert service_form_errors(service[:-2]) == ["no --state-dir"]
    misspelt = shell_words("ddp-coordinator --state-dir /s --max-runing 2")
    assert len(command_errors(misspelt, [])) == 1


def test_command_check_can_fail():
    ok = shell_words("srun --cpu-bind=cores ddp-train --data digits --metrics-port 9108 --no-bias")
    assert command_errors(ok, []) == []
    for bad in ["ddp-train --metrics-prot 9108",          # a misspelt option
                "ddp-train --data",                       # no value
                "ddp-train --insecure yes",               # a value it does not take
                "ddp-worker --connect tcp://h:5555 --min-workers 2",   # another command's option
                "ddp-trainer --steps 5"]:                 # no such command
        assert len(command_errors(shell_words(bad), [])) == 1, bad
    found = []
    assert command_errors(shell_words("mpirun -n 2 ddp-train --steps 5; ddp-predict --model m.npz "
                                      "--data digits"), found) == []
    assert found == ["ddp-train", "ddp-predict"]
    found = []
    assert command_errors(shell_words("ddp-train --checkpoint-dir /var/lib/ddp-train"), found) == []
    assert found == ["ddp-train"]
    # an option in a variable of a script is held to the script's command too
    assert len(shell_script_errors('ARGS="--data digits --stepz 3"\nddp-train $ARGS\n', [])) == 1


def test_slurm_script_commands():
    found = []
    assert shell_script_errors(SBATCH.read_text(), found) == []
    assert found == ["ddp-train"]
    text = SBATCH.read_text()
    assert "--metrics-port" in text and "--log-jsonl" in text


def systemd_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} with continuation lines joined (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in logical_lines(path.read_text()):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict, section: str, key: str) -> str | None:
    values = [v for k, v in unit.get(section, []) if k == key]
    return values[-1] if values else None


@pytest.mark.parametrize("name, command, restart", [
    ("ddp-coordinator.service", "ddp-coordinator", "on-failure"),   # exits only when stopped
    ("ddp-worker@.service", "ddp-worker", "always")])                # workers stay
def test_systemd_units(name, command, restart):
    unit = systemd_unit(SYSTEMD / name)
    found = []
    exec_start = unit_value(unit, "Service", "ExecStart")
    assert exec_start and command_errors(shell_words(exec_start), found) == []
    assert found == [command]
    assert unit_value(unit, "Service", "Restart") == restart
    assert unit_value(unit, "Service", "User") not in (None, "", "root", "0")
    assert unit_value(unit, "Service", "WorkingDirectory").startswith("/")
    # stopped by SIGTERM (143) is no failure; bad input (2) does not heal by restarting
    assert "143" in unit_value(unit, "Service", "SuccessExitStatus").split()
    assert "2" in unit_value(unit, "Service", "RestartPreventExitStatus").split()
    assert unit_value(unit, "Install", "WantedBy")
    if name.endswith("@.service"):
        assert "%i" in exec_start          # the instance picks the worker's key
        assert "--retry-for" not in exec_start   # it reconnects for ever: no exit 5 restart loop


def test_systemd_service_form():
    """The coordinator unit runs the service: its state in the unit's StateDirectory, the three
    kinds of keys under /etc/ddp-train/keys, SIGTERM to stop it."""
    unit = systemd_unit(SYSTEMD / "ddp-coordinator.service")
    words = shell_words(unit_value(unit, "Service", "ExecStart"))
    assert service_form_errors(words) == []
    state = unit_value(unit, "Service", "StateDirectory")
    assert option_value(words, "--state-dir") == f"/var/lib/{state}"
    assert unit_value(unit, "Service", "KillSignal") == "SIGTERM"
    keys = {flag: option_value(words, flag)
            for flag in ("--curve-secret", "--authorized-keys", "--client-keys")}
    assert keys == {"--curve-secret": "/etc/ddp-train/keys/coordinator.key_secret",
                    "--authorized-keys": "/etc/ddp-train/keys/authorized",
                    "--client-keys": "/etc/ddp-train/keys/clients"}
    worker = shell_words(unit_value(systemd_unit(SYSTEMD / "ddp-worker@.service"), "Service",
                                    "ExecStart"))
    assert option_value(worker, "--server-key") == "/etc/ddp-train/keys/coordinator.key"
    assert option_value(worker, "--curve-secret").startswith("/etc/ddp-train/keys/")
    # the workers size their threads to their share of the host unless told otherwise
    assert "--threads" not in worker


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("name", ["ddp-coordinator.service", "ddp-worker@.service"])
def test_systemd_analyze_verify(tmp_path, name):
    """systemd's own parser, with the binaries pointed at this installation's scripts."""
    text = (SYSTEMD / name).read_text().replace("/opt/ddp-train/bin/", BIN + "/")
    (tmp_path / name).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
                       capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if name.split("@")[0] in ln]
    assert r.returncode == 0 and complaints == [], r.stdout + r.stderr


def compose_command(service: dict) -> list[str]:
    words = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        words += shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
    return words


def compose_mounts(service: dict) -> list[tuple[str, Path]]:
    """(container path, host path) of the service's bind mounts, host paths resolved."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((target, (COMPOSE.parent / source).resolve()))
    return out


def option_value(words: list[str], flag: str) -> str | None:
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def test_compose():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"coordinator", "worker", "prometheus", "grafana"} <= set(services)
    found = []
    for service in services.values():
        assert command_errors(compose_command(service), found) == []
    assert sorted(found) == ["ddp-coordinator", "ddp-worker"]

    coordinator, worker = services["coordinator"], services["worker"]
    coord_words, worker_words = compose_command(coordinator), compose_command(worker)
    for service in (coordinator, worker):
        context = (COMPOSE.parent / service["build"]["context"]).resolve()
        assert context == ROOT and (context / "pyproject.toml").is_file()
        assert (context / service["build"]["dockerfile"]).resolve() == COMPOSE.parent / "Dockerfile"
        target = service["build"].get("target")
        if target:
            assert re.search(rf"^FROM .* AS {target}$", (COMPOSE.parent / "Dockerfile").read_text(),
                             re.M | re.I), f"no stage {target} in the Dockerfile"
    assert worker.get("deploy", {}).get("replicas", 1) == 2

    bind = option_value(coord_words, "--bind")
    assert bind.startswith("tcp://0.0.0.0:") and "--insecure" in coord_words
    assert option_value(worker_words, "--connect") == f"tcp://coordinator:{bind.rsplit(':', 1)[1]}"
    assert option_value(coord_words, "--metrics-addr") == "0.0.0.0"
    metrics_port = option_value(coord_words, "--metrics-port") or "9108"

    mounts = dict(compose_mounts(services["prometheus"]))
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert scrape_targets(config)["ddp-train"] == [f"coordinator:{metrics_port}"]
    assert scrape_targets(config)["pushgateway"] == ["pushgateway:9091"]
    assert "pushgateway" in services
    for service in services.values():
        for _, host_path in compose_mounts(service):
            assert host_path.exists(), host_path


def compose_volumes(service: dict) -> dict[str, str]:
    """{container path: named volume} of the service's named-volume mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith((".", "/")):
            out[target] = source
    return out


def test_compose_service_form():
    """The coordinator runs the service with its state on a named volume (kept by `docker
    compose down` without -v); it and the workers are restarted until stopped."""
    compose = yaml.safe_load(COMPOSE.read_text())
    coordinator, worker = compose["services"]["coordinator"], compose["services"]["worker"]
    words = compose_command(coordinator)
    assert service_form_errors(words) == []
    volume = compose_volumes(coordinator).get(option_value(words, "--state-dir"))
    assert volume in (compose.get("volumes") or {}), "--state-dir is not on a named volume"
    for service in (coordinator, worker):
        assert service.get("restart") in ("always", "unless-stopped")


def test_dockerfile():
    text = (COMPOSE.parent / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _dest = line.split()
        for source in sources:
            if not source.startswith("--"):
                assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
    # the package data and every package of pyproject.toml are copied
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = set()
    for package in tool["packages"]:  # the top folder of each: its package-dir, or its name
        mapped = [p for p in tool.get("package-dir", {}) if package == p or package.startswith(p + ".")]
        folders.add(tool["package-dir"][mapped[0]] if mapped else package.split(".")[0])
    assert folders == {"ddp", "worker", "coordinator"}
    for folder in folders:
        assert re.search(rf"^COPY {folder} ", text, re.M), folder


def k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def containers(node) -> list[dict]:
    """Every container of every pod template under node."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                out += value
            else:
                out += containers(value)
    elif isinstance(node, list):
        for value in node:
            out += containers(value)
    return out


def container_words(container: dict) -> list[str]:
    words = [str(w) for w in container.get("command", []) + container.get("args", [])]
    if len(words) >= 3 and os.path.basename(words[0]) in ("sh", "bash") and words[1] == "-c":
        words = shell_words(words[2])
    return words


@pytest.mark.parametrize("name", ["mpijob.yaml", "zmq.yaml"])
def test_k8s_commands(name):
    found = []
    for doc in k8s_docs(name):
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
        for container in containers(doc):
            assert command_errors(container_words(container), found) == [], \
                container["name"]
    assert found, f"{name} runs no ddp-* command"


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_k8s_mpijob():
    docs = k8s_docs("mpijob.yaml")
    (job,) = by_kind(docs, "MPIJob")
    assert job["apiVersion"] == "kubeflow.org/v2beta1"
    specs = job["spec"]["mpiReplicaSpecs"]
    (launcher,) = containers(specs["Launcher"])
    words = container_words(launcher)
    assert words[0] == "mpirun" and words[1] == "-n"
    ranks = int(words[2])
    assert ranks == specs["Worker"]["replicas"] * job["spec"].get("slotsPerWorker", 1)
    assert words[3] == "ddp-train"
    assert option_value(words, "--metrics-addr") == "0.0.0.0"
    port = int(option_value(words, "--metrics-port"))
    # rank 0 serves the metrics on worker pod 0: a Service selects it by the operator's labels
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["selector"] == {
        "training.kubeflow.org/job-name": job["metadata"]["name"],
        "training.kubeflow.org/job-role": "worker",
        "training.kubeflow.org/replica-index": "0"}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port]
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def container_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return number


def test_k8s_zmq():
    docs = k8s_docs("zmq.yaml")
    (service,) = by_kind(docs, "Service")
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    coordinator, worker = deployments["ddp-coordinator"], deployments["ddp-worker"]
    for d in (coordinator, worker):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    coord_labels = coordinator["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= coord_labels.items()
    assert not service["spec"]["selector"].items() <= worker["spec"]["template"]["metadata"][
        "labels"].items()
    assert worker["spec"]["replicas"] == 2 and coordinator["spec"]["replicas"] == 1

    (coord,) = containers(coordinator)
    (work,) = containers(worker)
    coord_words, worker_words = container_words(coord), container_words(work)
    assert coord_words[0] == "ddp-coordinator" and worker_words[0] == "ddp-worker"
    zmq_port = int(option_value(coord_words, "--bind").rsplit(":", 1)[1])
    metrics_port = int(option_value(coord_words, "--metrics-port") or 9108)
    assert option_value(coord_words, "--metrics-addr") == "0.0.0.0"
    ports = {p["port"]: container_port(coord, p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {5555: zmq_port, 9108: metrics_port}
    assert option_value(worker_words, "--connect") == f"tcp://{service['metadata']['name']}:5555"
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)
    for probe, path in (("readinessProbe", "/metrics"), ("livenessProbe", "/healthz")):
        get = coord[probe]["httpGet"]
        assert get["path"] == path and container_port(coord, get["port"]) == metrics_port


def test_k8s_zmq_service_form():
    """The coordinator runs the service with its --state-dir on a PersistentVolumeClaim of the
    same file; one pod at a time holds it (Recreate)."""
    docs = k8s_docs("zmq.yaml")
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    coordinator = deployments["ddp-coordinator"]
    (coord,) = containers(coordinator)
    words = container_words(coord)
    assert service_form_errors(words) == []
    mounts = {m["mountPath"]: m["name"] for m in coord.get("volumeMounts", [])}
    volume_name = mounts[option_value(words, "--state-dir")]
    volumes = {v["name"]: v for v in coordinator["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[volume_name]["persistentVolumeClaim"]["claimName"]
    assert claim in [d["metadata"]["name"] for d in by_kind(docs, "PersistentVolumeClaim")]
    assert coordinator["spec"]["strategy"]["type"] == "Recreate"


# --- the Slurm script, run for real (a stand-in srun starts the ranks with mpirun)


def test_slurm_script_runs(tmp_path):
    if MPIRUN is None:
        pytest.skip("no mpirun/mpiexec found (pip install mpich)")
    fake = tmp_path / "bin"
    fake.mkdir()
    # srun as Slurm 22.05 behaves with the mpich wheel: --mpi=pmi2 gives one job of 2 ranks;
    # without a plugin, 2 tasks that each see an MPI world of one
    (fake / "srun").write_text(
        "#!/bin/bash\nmpi=none\n"
        'while [[ "$1" == -* ]]; do [[ "$1" == --mpi=* ]] && mpi=${1#--mpi=}; shift; done\n'
        'export SLURM_JOB_ID=1 SLURM_STEP_ID=0 SLURM_NTASKS=2 SLURM_STEP_NUM_TASKS=2\n'
        f'[[ $mpi == pmi2 ]] && exec {shlex.quote(MPIRUN)} -n 2 "$@"\n'
        'SLURM_PROCID=0 "$@" & a=$!; SLURM_PROCID=1 "$@" & b=$!\n'
        'wait $a; ra=$?; wait $b; rb=$?; exit $(( ra > rb ? ra : rb ))\n')
    (fake / "srun").chmod(0o755)
    ckpt, port = tmp_path / "run" / "ckpt", free_port()
    env = {**os.environ, "PATH": f"{fake}:{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "SLURM_JOB_NAME": "ddp-test", "SLURM_CPUS_PER_TASK": "1", "SLURMD_NODENAME": "node07",
           "TRAIN_ARGS": "--data spiral --steps 60 --val-fraction 0.2 --eval-every 20",
           "CKPT_DIR": str(ckpt), "METRICS_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    env.pop("PUSHGATEWAY", None)
    r = run(["bash", str(SBATCH)], timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"rank 0 serves http://node07:{port}/" in r.stdout
    summary = read_json(ckpt / "summary.json")
    assert summary["steps"] == 60 and summary["world_size"] == 2
    assert (ckpt / "model.npz").is_file() and (ckpt / "ckpt-00000060.npz").is_file()
    events = [json.loads(line) for line in (ckpt / "train.jsonl").read_text().splitlines()]
    assert events and events[-1]["event"] == "end"
    assert any(e["event"] == "step" for e in events)

    # an srun plugin that does not match the MPI: the two tasks refuse, nothing is written
    other = tmp_path / "other"
    r = run(["bash", str(SBATCH)], timeout=120, cwd=tmp_path,
            env={**env, "SRUN_MPI": "pmix", "CKPT_DIR": str(other)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "srun started 2 tasks but MPI sees a world of 1" in r.stderr
    assert not (other / "summary.json").exists() and not list(other.glob("ckpt-*"))


def job_command(*args: str) -> list[str]:
    """ddp-job: the installed script, else `python -m ddp job`."""
    script = shutil.which("ddp-job", path=BIN)
    return [script, *args] if script else [PY, "-m", "ddp", "job", *args]


def test_systemd_units_run_the_service(tmp_path):
    """The two units' ExecStart lines, run as systemd would (paths moved into tmp_path,
    loopback instead of 0.0.0.0), with CURVE keys from ddp-keygen at the paths the units name:
    a client key submits a job that the two workers train, a worker key may not submit,
    SIGTERM stops the service with 143 (SuccessExitStatus) while the workers stay."""
    from ddp.keygen import run_keygen

    etc, state = tmp_path / "etc", tmp_path / "state"
    for d in (etc, state):
        d.mkdir()
    r = call(run_keygen, [str(etc / "keys"), "--name", "worker-1", "--name", "worker-2",
                          "--client", "ops"])
    assert r.returncode == 0, r.stderr
    zmq_port, metrics_port = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{zmq_port}"
    moves = {"/opt/ddp-train/bin/": BIN + "/", "/etc/ddp-train": str(etc),
             "/var/lib/ddp-train": str(state), "tcp://0.0.0.0:5555": endpoint,
             "--metrics-addr 0.0.0.0": "--metrics-addr 127.0.0.1",
             "--metrics-port 9108": f"--metrics-port {metrics_port}",
             "${DDP_COORDINATOR}": endpoint}

    def exec_start(name: str, instance: str = "") -> list[str]:
        line = unit_value(systemd_unit(SYSTEMD / name), "Service", "ExecStart")
        for old, new in moves.items():
            line = line.replace(old, new)
        assert "0.0.0.0" not in line and "$" not in line, line
        return shell_words(line.replace("%i", instance))

    def job(key: str, *args: str):
        return run(job_command(args[0], "--connect", endpoint, "--curve-secret",
                               str(etc / "keys" / f"{key}.key_secret"), "--server-key",
                               str(etc / "keys" / "coordinator.key"), *args[1:]), timeout=120)

    started = []
    try:
        service = Proc(exec_start("ddp-coordinator.service"), cwd=state)
        started.append(service)
        workers = [Proc(exec_start("ddp-worker@.service", str(i)), cwd=state) for i in (1, 2)]
        started += workers
        deadline = time.monotonic() + 60
        while True:     # 5: no service answered yet (it may still be starting)
            r = job("ops", "submit", "--data", "spiral", "--steps", "40", "--min-workers", "2",
                    "--name", "systemd")
            if r.returncode != 5 or time.monotonic() > deadline or service.p.poll() is not None:
                break
            time.sleep(0.5)
        assert r.returncode == 0, r.stdout + r.stderr + service.stderr
        job_id = r.stdout.strip().splitlines()[-1]
        r = job("ops", "wait", job_id)
        assert r.returncode == 0, r.stdout + r.stderr + service.stderr
        r = job("ops", "fetch", job_id, "--output", str(tmp_path / "model.npz"))
        assert r.returncode == 0, r.stdout + r.stderr

        refused = job("worker-1", "submit", "--data", "spiral", "--steps", "40")
        assert refused.returncode == 2 and one_error_line(refused.stderr, "ddp-job"), \
            refused.stdout + refused.stderr

        service.p.terminate()
        assert service.wait(120) == 143, service.stderr
        assert all(w.p.poll() is None for w in workers), [w.stderr for w in workers]
    finally:
        for proc in started:
            proc.kill()
    record = state / "jobs" / job_id
    summary = read_json(record / "summary.json")
    assert summary["steps"] == 40
    assert (record / "job.json").is_file() and (record / "config.toml").is_file()
    served, fetched = load_model(record / "model.npz"), load_model(tmp_path / "model.npz")
    assert served.keys() == fetched.keys()
    assert all((served[k] == fetched[k]).all() for k in served)
