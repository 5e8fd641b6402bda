"""`aigc-ray` command line: parse -> load config -> preflight -> ray.init -> one call.

Every check that can fail without Ray (config keys, input paths, model directories) runs
before Ray starts, so a mistake costs a second, not a cluster start.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from aigc_ray.client import http_complete
from aigc_ray.config import ConfigError, PipelineConfig, load_config, write_resolved
from aigc_ray.errors import AigcRayError, PipelineError
from aigc_ray.model import perplexity
from aigc_ray.storage import is_uri, owner_only_files, protect_outputs

log = logging.getLogger("aigc_ray")


# ---------------------------------------------------------------- setup helpers


def init_ray(verbose: bool = False) -> None:
    """Connect to RAY_ADDRESS (e.g. under `ray job submit`) or start a local instance."""
    import ray

    if ray.is_initialized():
        return
    quiet = {
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        cpus = os.cpu_count() or 2
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=2 * 1024**3, **quiet)
    if not verbose:
        quiet_ray_data()


class _UntrueWarnings(logging.Filter):
    """Ray Data's driver warnings that are not true of our stages:
    - "...does not have any available CPUs. The Dataset job will hang...": Ray Data checks the
      free CPUs when a dataset starts; our own stage's tasks (or a Serve replica beside it) hold
      them then, and the job does not hang: it runs as they finish;
    - "Progress bars disabled. To enable...": we disable them on purpose outside a terminal."""

    UNTRUE = ("The Dataset job will hang unless more CPUs", "Progress bars disabled.")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.UNTRUE)


def quiet_ray_data() -> None:
    """Ray Data's progress: bars on a terminal, nothing in a log file (it would print ~90 INFO
    lines per command there); its full log stays in the session's ray-data.log. Serve's INFO
    lines on the driver ("Started Serve in namespace...") go too: the command prints its own."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    untrue = _UntrueWarnings()
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":  # its console handler
            handler.setLevel(logging.WARNING)
            handler.addFilter(untrue)
    for name in ("ray.data", "ray.data.dataset", "ray.data._internal.progress"):
        logging.getLogger(name).addFilter(untrue)
    # Serve sets its logger's level and handlers when ray.serve is imported (later, in a
    # stage): a filter on the logger itself is what survives that.
    logging.getLogger("ray.serve").addFilter(_warnings_and_above)


def _warnings_and_above(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def stages_of(command: str, cfg: PipelineConfig) -> set[str]:
    """The stages a command runs: the pipeline's include optimize when it is enabled."""
    optimize = command == "pipeline" and cfg.optimize.enabled and cfg.task == "text"
    return STAGES[command] | ({"optimize"} if optimize else set())


def preflight(cfg: PipelineConfig, stages: set[str]) -> None:
    """Fail fast (before Ray) on missing inputs, an empty corpus or a bad model directory."""
    from aigc_ray.data import read_manifest, resolve_inputs
    from aigc_ray.model import check_model_dir

    if cfg.task == "image":
        return _image_preflight(cfg, stages)
    if "preprocess" in stages:
        resolve_inputs(cfg.data)
    elif "train" in stages:
        from aigc_ray.train import preflight as train_preflight

        read_manifest(cfg.resolved_data_dir())
        train_preflight(cfg.train, cfg.model, cfg.resolved_data_dir())
    if "serve" in stages:
        from aigc_ray.serve import check_bind, load_api_keys

        check_bind(cfg.serve.host, load_api_keys())
    if "generate" in stages:
        from aigc_ray.generate import preflight as generate_preflight

        generate_preflight(cfg.generate, cfg.generate_model_dir())
    if "optimize" in stages:
        if is_uri(cfg.optimize.output_dir):
            raise ConfigError(
                "optimize.output_dir must be a local directory (copy it to object "
                "storage afterwards, or serve it from the node)"
            )
        if "train" not in stages:  # in the pipeline, training makes it
            check_model_dir(cfg.optimize_source_dir())
    if "serve" in stages and "train" not in stages:
        try:
            served = cfg.serve.served_models(cfg.serve_model_dir())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for model in served:
            check_model_dir(model.model_dir)


def _image_preflight(cfg: PipelineConfig, stages: set[str]) -> None:
    from aigc_ray.images.model import check_image_model_dir

    if "preprocess" in stages:
        from aigc_ray.data import DataError
        from aigc_ray.images.data import DIGITS

        for spec in cfg.images.data.inputs:
            if spec != DIGITS and not is_uri(spec) and not Path(spec).exists():
                raise DataError(f"images.data.inputs: {spec} does not exist")
    elif "train" in stages:
        from aigc_ray.images.train import image_preflight

        image_preflight(cfg.images.train, cfg.images.data.output_dir)
    if "serve" in stages:
        from aigc_ray.serve import check_bind, load_api_keys

        check_bind(cfg.serve.host, load_api_keys())
        if "train" not in stages:
            check_image_model_dir(cfg.serve_model_dir())
    if "generate" in stages:
        from aigc_ray.images.generate import image_generate_preflight

        image_generate_preflight(cfg.images.generate, _image_generate_dir(cfg))
    if "optimize" in stages:
        raise ConfigError("aigc-ray optimize works on language models (task: text)")


def _image_generate_dir(cfg: PipelineConfig) -> str:
    return cfg.images.generate.model_dir or cfg.default_model_dir()


# ---------------------------------------------------------------- stages


def cmd_preprocess(cfg: PipelineConfig) -> dict:
    from aigc_ray.data import format_report, run_preprocess

    m = run_preprocess(cfg.data)
    print(f"preprocess ({m['seconds']} s) -> {cfg.data.output_dir}\n{format_report(m)}", flush=True)
    return m


def cmd_train(cfg: PipelineConfig):
    from aigc_ray.train import fit

    r = fit(cfg.train, cfg.model, cfg.resolved_data_dir())
    print(r.summary(), flush=True)
    return r


def cmd_serve(cfg: PipelineConfig, model_dir: str) -> tuple[str, list[tuple[str, str]]]:
    from aigc_ray.serve import engine_report, run_serve

    what = "serve: starting the replicas"
    if cfg.task == "text":
        engines = sorted({m.engine for m in cfg.serve.served_models(model_dir)})
        what += f" (engine {', '.join(engines)}"
        if {"auto", "vllm"} & set(engines):
            what += "; vLLM's first start compiles the model: a minute or two on a CPU"
        what += ")"
    print(f"{what} ...", flush=True)
    url = run_serve(cfg.serve, model_dir)
    for name, info in engine_report().items():
        version = f" {info['engine_version']}" if info["engine_version"] else ""
        print(f"serve: {name} on {info['engine']}{version} ({info['engine_reason']})", flush=True)
    samples = []
    if cfg.task == "image":
        print(f"serve: {cfg.serve.model_name} at {url}/v1/images/generations", flush=True)
        return url, samples
    for prompt in cfg.serve.sample_prompts:
        body = http_complete(
            url,
            cfg.serve.model_name,
            prompt,
            cfg.serve.sample_max_tokens,
            cafile=cfg.serve.tls_ca_file,
        )
        samples.append((prompt, body["choices"][0]["text"]))
    print(f"serve: {cfg.serve.model_name} at {url}/v1 ({len(samples)} sample requests ok)")
    return url, samples


def cmd_optimize(cfg: PipelineConfig, model_dir: str | None = None) -> dict:
    """Optimize the trained model (or optimize.model_dir); print the report."""
    from aigc_ray.optimize import format_report, run_optimize

    data_dir = cfg.resolved_data_dir()
    has_data = is_uri(data_dir) or (Path(data_dir) / "manifest.json").exists()
    report = run_optimize(
        cfg.optimize,
        model_dir or cfg.optimize_source_dir(),
        data_dir if has_data else None,
        _recovery(cfg),
    )
    print(f"optimize -> {cfg.optimize.output_dir}\n{format_report(report)}", flush=True)
    return report


def _recovery(cfg: PipelineConfig):
    """The recovery fine-tune after pruning: the trainer, starting from the pruned model."""

    def run(pruned_dir: str, steps: int) -> str:
        from aigc_ray.train import fit

        out = Path(cfg.optimize.output_dir)
        run_dir = str(out.with_name(out.name + ".recovery"))
        shutil.rmtree(run_dir, ignore_errors=True)  # same name would resume an older run
        tcfg = cfg.train.model_copy(
            update={
                "max_steps": steps,
                "run_dir": run_dir,
                "name": "recovery",
                "export_dir": None,
                "storage_path": None,
                "warmup_steps": min(cfg.train.warmup_steps, steps // 10),
                "eval_every": steps,
                "checkpoint_every": steps,
            }
        )
        mcfg = cfg.model.model_copy(update={"pretrained": pruned_dir, "lora_r": None})
        return fit(tcfg, mcfg, cfg.resolved_data_dir()).model_dir

    return run


def check_learned(
    val_initial: float | None, val_final: float | None, min_gain: float = 0.1
) -> None:
    """Raise PipelineError unless validation loss fell by at least `min_gain` (fraction)."""
    if val_initial is None or val_final is None:
        raise PipelineError("no validation loss was measured: set data.val_fraction > 0")
    if val_final > val_initial * (1 - min_gain):
        raise PipelineError(
            f"the model did not learn: validation loss {val_initial:.3f} (untrained) -> "
            f"{val_final:.3f} (trained); expected at least {min_gain:.0%} lower"
        )


def format_summary(
    m: dict, r, url: str, samples: list[tuple[str, str]], seconds: float, served: str | None = None
) -> str:
    tr, va = m["splits"]["train"], m["splits"]["val"]
    lines = [
        "",
        "=" * 72,
        "aigc_ray pipeline summary",
        "=" * 72,
        f"documents      {m['docs_read']} read, {m['docs_kept']} kept",
        f"tokens         {m['tokens']:,} ({m['vocab_size']}-token BPE), "
        f"{tr['blocks']} train / {va['blocks']} val blocks of {m['seq_len']}",
        f"shards         {len(tr['shards']) + len(va['shards'])} parquet files",
        f"training       {r.steps} steps, {r.tokens:,} tokens, {r.params / 1e6:.1f}M params, "
        f"{r.seconds} s",
        f"train loss     {r.first_loss:.3f} -> {r.last_loss:.3f}",
        f"val loss       {r.val_loss_initial:.3f} untrained -> {r.val_loss_final:.3f} trained "
        f"(perplexity {perplexity(r.val_loss_initial):,.0f} -> "
        f"{perplexity(r.val_loss_final):,.1f})",
        f"model dir      {r.model_dir}",
        f"served model   {served or r.serving_dir}",
        f"endpoint       {url}/v1 (OpenAI-compatible)",
        "samples (greedy, over HTTP):",
    ]
    for prompt, text in samples:
        lines.append(f"  --- {prompt!r}\n{_indent(prompt + text)}")
    lines += [f"wall time      {seconds:.0f} s", "=" * 72]
    return "\n".join(lines)


def cmd_dashboards(grafana_dir: str | None) -> int:
    from aigc_ray.dashboards import DashboardError, install_dashboards

    try:
        written = install_dashboards(grafana_dir)
    except DashboardError as e:
        print(f"aigc-ray: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(f"wrote {p}" for p in written))
    ini = written[-1].parents[2] / "grafana.ini"
    if ini.is_file():  # Ray's setup; a stock Grafana reloads its provisioning on restart
        print(f"start Grafana with: grafana-server --config {ini} web")
    return 0


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines()[:12])


def cmd_cluster(args) -> int:
    """`aigc-ray cluster local up|down|status` (see aigc_ray.cluster)."""
    from aigc_ray import cluster as lc

    try:
        if args.action == "up":
            owner_only_files()  # as cluster.yaml's start commands (umask 077)
            c = lc.local_up(
                args.cluster_yaml,
                args.dir,
                idle_timeout_s=args.idle_timeout_s,
                object_store_mb=args.object_store_mb,
            )
            print(lc.banner(c, lc.load_cluster_yaml(args.cluster_yaml)), flush=True)
        elif args.action == "down":
            n = lc.local_down(args.dir)
            print(f"local cluster in {args.dir} stopped ({n} processes; none left)", flush=True)
        else:
            print(lc.local_status(args.dir), flush=True)
    except AigcRayError as e:
        print(f"aigc-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_tls(args) -> int:
    """`aigc-ray tls make`: a private CA and a certificate for --host (aigc_ray.tls)."""
    from aigc_ray.tls import make_certs, make_node_cert, node_hosts

    owner_only_files()
    try:
        if args.action == "node":
            hosts = args.host or node_hosts()
            paths = make_node_cert(args.dir, hosts, days=args.days)
            print(f"node certificate {paths['cert']} for {', '.join(hosts)}")
            return 0
        if not args.host:
            raise AigcRayError("tls make: name at least one --host")
        paths = make_certs(args.dir, args.host, days=args.days)
    except AigcRayError as e:
        print(f"aigc-ray: error: {e}", file=sys.stderr)
        return 2
    print(
        f"CA          {paths['ca']}  (what clients trust: serve.tls_ca_file)\n"
        f"certificate {paths['cert']}  for {', '.join(args.host)}, {args.days} days\n"
        f"key         {paths['key']}  (0600)\n"
        f"HTTPS: serve.tls_certfile={paths['cert']} serve.tls_keyfile={paths['key']}",
        flush=True,
    )
    return 0


def cmd_pipeline(cfg: PipelineConfig) -> tuple[str, str]:
    """Run every stage; print the summary; return (endpoint URL, summary). Leaves it serving."""
    t0 = time.time()
    write_resolved(cfg, Path(cfg.train.run_dir).parent, "pipeline_config.resolved.json")
    n = 4 if cfg.optimize.enabled else 3
    print(f"[1/{n}] preprocess (Ray Data) ...", flush=True)
    m = cmd_preprocess(cfg)
    print(f"[2/{n}] train (Ray Train TorchTrainer) ...", flush=True)
    r = cmd_train(cfg)
    check_learned(r.val_loss_initial, r.val_loss_final)
    serving_dir = r.serving_dir
    if cfg.optimize.enabled:
        print(f"[3/{n}] optimize ...", flush=True)
        cmd_optimize(cfg, r.serving_dir)  # a rejected model raises: it is never served
        serving_dir = cfg.optimize.output_dir
    print(f"[{n}/{n}] serve (Ray Serve) ...", flush=True)
    served = cfg.serve.model_dir or serving_dir
    url, samples = cmd_serve(cfg, served)
    summary = format_summary(m, r, url, samples, time.time() - t0, served)
    print(summary, flush=True)
    return url, summary


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aigc-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("preprocess", "Ray Data: corpus -> parquet shards"),
        ("train", "Ray Train: shards -> model directory"),
        ("optimize", "prune / bf16 / int8 / int4 a model directory + report"),
        ("serve", "Ray Serve: model directory -> OpenAI API"),
        ("pipeline", "preprocess -> train -> serve -> sample requests"),
        ("generate", "Ray Data + engine: prompts -> parquet of completions"),
    ]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", default="configs/tiny.yaml", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="section.key=value overrides")
        s.add_argument("--verbose", action="store_true", help="show Ray's worker logs")
        if name in ("serve", "pipeline"):
            s.add_argument(
                "--keep-serving",
                action="store_true",
                help="leave the endpoint up: on a cluster (RAY_ADDRESS) exit and keep it "
                "deployed; on a local Ray started here, block until Ctrl-C",
            )
    doc = sub.add_parser(
        "doctor", help="versions, GPUs, token auth, cluster resources; warns on mismatches (exit 1)"
    )
    doc.add_argument("--verbose", action="store_true", help="show Ray's logs")
    doc.add_argument(
        "--config", help="also check that this config's GPU demands fit cluster.yaml's node types"
    )
    doc.add_argument("--cluster-yaml", default="cluster.yaml", help="the cluster file")
    doc.add_argument("overrides", nargs="*", help="section.key=value overrides of --config")
    dash = sub.add_parser(
        "dashboards",
        help="install the Grafana dashboards into Ray's Grafana setup (docs/monitoring.md)",
    )
    dash.add_argument(
        "--grafana-dir",
        help="Grafana config dir to install into (default: the latest Ray session's, "
        "<ray temp dir>/session_latest/metrics/grafana)",
    )
    cl = sub.add_parser(
        "cluster",
        help="cluster.yaml on this machine: `aigc-ray cluster local up|down|status` "
        "(the Ray autoscaler on the fake-multinode provider; docs/cluster.md)",
    )
    cl.add_argument("where", choices=["local"])
    cl.add_argument("action", choices=["up", "down", "status"])
    cl.add_argument("--cluster-yaml", default="cluster.yaml", help="the cluster file to copy")
    cl.add_argument(
        "--dir", default="runs/local-cluster", help="state dir (token, derived config, addresses)"
    )
    cl.add_argument(
        "--idle-timeout-s",
        type=float,
        help="remove idle workers after this many seconds (default: cluster.yaml's "
        "idle_timeout_minutes)",
    )
    cl.add_argument(
        "--object-store-mb", type=int, default=256, help="object store of each local node"
    )
    tls = sub.add_parser(
        "tls",
        help="`aigc-ray tls make --host H [--host H2]`: a private CA and a certificate for the "
        "hosts (HTTPS on the endpoint: serve.tls_certfile/keyfile); `aigc-ray tls node --dir "
        "D`: this node's certificate from the CA in D (Ray's TLS; docs/security.md)",
    )
    tls.add_argument("action", choices=["make", "node"])
    tls.add_argument(
        "--host",
        action="append",
        help="a DNS name or IP address clients use (repeat; the first is the common name); "
        "node: default this node's IP, name and loopback",
    )
    tls.add_argument(
        "--dir",
        default="runs/tls",
        help="make: where ca.crt, server.crt and keys go; node: the dir holding ca.crt and "
        "ca.key, where node.crt and node.key go",
    )
    tls.add_argument("--days", type=int, default=365, help="validity of the certificates")
    sub.add_parser(
        "submit",
        add_help=False,
        help="`ray job submit --working-dir .` after refusing an upload over Ray's "
        "limit: aigc-ray submit [ray job submit options] -- python jobs/<x>.py ...",
    )
    return p


STAGES = {
    "preprocess": {"preprocess"},
    "train": {"train"},
    "serve": {"serve"},
    "optimize": {"optimize"},
    "pipeline": {"preprocess", "train", "serve"},
    "generate": {"generate"},
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["submit"]:  # everything after `submit` belongs to `ray job submit`
        from aigc_ray.submit import UploadError, submit

        try:
            return submit(argv[1:])
        except (UploadError, AigcRayError) as e:
            print(f"aigc-ray: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    if args.command == "dashboards":
        return cmd_dashboards(args.grafana_dir)
    if args.command == "cluster":
        return cmd_cluster(args)
    if args.command == "tls":
        return cmd_tls(args)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command == "doctor":
        from aigc_ray.doctor import report

        text, warnings = report()
        print(text)
        if args.config:
            from aigc_ray.cluster import fit_problems, load_cluster_yaml

            try:
                cfg = load_config(args.config, args.overrides)
                problems = fit_problems(cfg, load_cluster_yaml(args.cluster_yaml))
            except AigcRayError as e:
                problems = [str(e)]
            for p in problems:
                print(f"WARNING: {p}")
            if not problems:
                print(f"ok: {args.config} fits the node types of {args.cluster_yaml}")
            warnings = [*warnings, *problems]
        return 1 if warnings else 0
    # what the stages write (and the local Ray this command may start) is owner-only
    owner_only_files()
    try:
        cfg = load_config(args.config, args.overrides)
        stages = stages_of(args.command, cfg)
        preflight(cfg, stages)
        for line in protect_outputs(
            cfg.output_locations(stages), cfg.storage.encryption, cfg.storage.kms_key_id
        ):
            print(f"storage: {line}", flush=True)
    except AigcRayError as e:  # found before Ray started; anything else is a bug: traceback
        print(f"aigc-ray: error: {e}", file=sys.stderr)
        return 2
    if args.command != "optimize" or cfg.optimize.recovery_steps:  # optimize alone needs no Ray
        init_ray(args.verbose)
    try:
        return _dispatch(args, cfg)
    except AigcRayError as e:  # a stage failed for a reason it names (DataError, TrainError...)
        print(f"aigc-ray: FAILED: {e}", file=sys.stderr)
        return 1


def _dispatch_image(args, cfg: PipelineConfig) -> int:
    """The same commands for ``task: image`` (configs/digits.yaml)."""
    if args.command == "preprocess":
        from aigc_ray.images.data import format_image_report, run_image_preprocess

        m = run_image_preprocess(cfg.images.data)
        print(f"preprocess ({m['seconds']} s) -> {cfg.images.data.output_dir}")
        print(format_image_report(m), flush=True)
    elif args.command == "train":
        from aigc_ray.images.train import fit_images

        r = fit_images(cfg.images.train, cfg.images.model, cfg.images.data.output_dir)
        print(r.summary(), flush=True)
    elif args.command == "generate":
        from aigc_ray.images.generate import run_image_generate

        s = run_image_generate(cfg.images.generate, _image_generate_dir(cfg))
        print(
            f"generate: {s['rows']} rows, {s['images']} images ({s['errors']} rows with errors, "
            f"{s['quarantined']} unreadable rows quarantined) in {s['seconds']} s "
            f"({s['images_per_s']} images/s) -> {s['output_dir']}/images, "
            f"{s['output_dir']}/index",
            flush=True,
        )
    elif args.command == "serve":
        url, _ = cmd_serve(cfg, cfg.serve_model_dir())
        _after_serving(url, args.keep_serving)
    else:
        from aigc_ray.images.flow import run_image_pipeline

        url, _ = run_image_pipeline(cfg)
        _after_serving(url, args.keep_serving)
    return 0


def _dispatch(args, cfg: PipelineConfig) -> int:
    if cfg.task == "image":
        return _dispatch_image(args, cfg)
    if args.command == "preprocess":
        cmd_preprocess(cfg)
    elif args.command == "train":
        cmd_train(cfg)
    elif args.command == "optimize":
        cmd_optimize(cfg)
    elif args.command == "generate":
        from aigc_ray.generate import run_generate

        summary = run_generate(cfg.generate, cfg.generate_model_dir())
        print(
            f"generate: {summary['rows']} rows ({summary['errors']} with errors, "
            f"{summary['quarantined']} unreadable rows quarantined), "
            f"{summary['completion_tokens']:,} tokens in {summary['seconds']} s "
            f"({summary['tokens_per_s']} tok/s) -> {summary['output_dir']}",
            flush=True,
        )
    elif args.command == "serve":
        url, samples = cmd_serve(cfg, cfg.serve_model_dir())
        for prompt, text in samples:
            print(f"--- {prompt!r}\n{_indent(prompt + text)}")
        _after_serving(url, args.keep_serving)
    else:
        url, _ = cmd_pipeline(cfg)
        _after_serving(url, args.keep_serving)
    return 0


STOP_WAIT_S = 45  # Serve's 20 s graceful shutdown per replica, the ingress drain, slack


def stop_serving(app_name: str = "aigc") -> None:
    """Stop what the command deployed: its application (the replicas drain and stop their
    engines), then, on the local instance the command started itself, Ray with Serve's
    controller and proxies. serve.shutdown() is not used: it kills the controller while its own
    call is in flight, and Ray prints two "(raylet) Task ServeController... failed" notices for
    that. On a cluster (RAY_ADDRESS), Serve stays up for the cluster's other applications.

    The wait for the app is bounded (STOP_WAIT_S: replicas get Serve's 20 s graceful shutdown
    and the ingress its drain): a replica that never stops does not hold the command; the
    local Ray it started is stopped with everything on it anyway."""
    import ray
    from ray import serve

    serve.delete(app_name, _blocking=False)  # public signature; the wait is ours, bounded
    deadline = time.monotonic() + STOP_WAIT_S
    while app_name in serve.status().applications:
        if time.monotonic() > deadline:
            print(
                f"serve: app {app_name!r} still stopping after {STOP_WAIT_S} s"
                + ("" if os.environ.get("RAY_ADDRESS") else "; stopping the local Ray"),
                flush=True,
            )
            break
        time.sleep(0.5)
    if not os.environ.get("RAY_ADDRESS"):
        ray.shutdown()


def _after_serving(url: str, keep: bool) -> None:
    if not keep:
        stop_serving()
    elif not os.environ.get("RAY_ADDRESS"):
        print(f"serving at {url}/v1; Ctrl-C to stop", flush=True)
        _wait_forever()
    else:
        print(f"left serving at {url}/v1 on the cluster", flush=True)


def _wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop_serving()


if __name__ == "__main__":
    sys.exit(main())
