"""``edgeloop`` command line (app layer): ioc, edge, retrain-service, demo, hedm-accuracy."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgeloop.app import signals
from edgeloop.codecs import CODECS
from edgeloop.config import MODES, Config, pin_loopback
from edgeloop.log import config_logging, verbosity_level
from edgeloop.remote.executors import EXECUTORS


def _config(args) -> Config:
    cfg = Config.load(args.config)
    cfg.prefix = args.prefix
    for name in ("data_dir", "registry_dir", "executor"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    for name in ("operators", "service_user", "hosts"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg.security, name, value)
    return cfg


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _access_flags(p) -> None:
    p.add_argument(
        "--operators",
        type=_names,
        help="users who may write the control PVs, comma-separated (default: the config's "
        "security.operators, else the user running edgeloop)",
    )
    p.add_argument(
        "--service-user",
        help="the retraining service's user, the only one that writes the status records "
        "(default: the config's, else the user running edgeloop)",
    )
    p.add_argument(
        "--hosts",
        type=_names,
        help="hosts control writes may come from, comma-separated (default: the config's, "
        "else any host)",
    )


def cmd_ioc(args) -> None:
    """The ML IOC; with --simulate, the simulated beamline too (on loopback unless the
    EPICS server interface lists say otherwise), which must never stand in for a real
    detector unasked."""
    from edgeloop.ioc import beamline, softioc

    cfg = _config(args)
    ml_ioc: list = []
    env = dict(os.environ)  # before serve() sets the beamline's own EPICS_CA_SERVER_PORT

    def start_ml_ioc() -> None:  # once the beamline answers: ml:Status up means all is up
        ml_ioc.append(
            softioc.start(
                cfg.prefix,
                env=env,
                security=cfg.security,
                policy=cfg.policy,
                retention=cfg.retention,
            )
        )

    try:
        if args.simulate or args.no_ml_ioc:
            signals.note(beamline.serve(cfg, on_ready=None if args.no_ml_ioc else start_ml_ioc))
        else:
            start_ml_ioc()
            ml_ioc[0].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in ml_ioc:
            proc.terminate()
            proc.wait(10)


def cmd_edge(args) -> None:
    if args.workers < 1 or (args.worker is not None and args.worker < 1):
        sys.exit("edge: --workers and --worker take a number >= 1")
    if args.worker is not None:
        from edgeloop.app.worker_pool import serve_worker

        serve_worker(_config(args), args.worker, args.input_pv, args.distributor)
    elif args.workers > 1 or args.remote_workers:
        from edgeloop.app.worker_pool import run_workers, worker_args

        run_workers(
            _config(args),
            args.workers,
            args.input_pv,
            args.distributor,
            worker_args(args),
            remote=args.remote_workers,
        )
    else:
        from edgeloop.edge_pva.inference import BackendUnavailable
        from edgeloop.edge_pva.server import EdgeServer
        from edgeloop.registry import RegistryCorrupt

        try:
            edge = EdgeServer(_config(args), input_pv=args.input_pv)
        except (BackendUnavailable, RegistryCorrupt) as exc:
            sys.exit(f"edgeloop edge: {exc}")
        edge.serve_forever()


def cmd_retrain_service(args) -> None:
    from edgeloop.remote.service import RetrainService

    RetrainService(_config(args), input_pv=args.input_pv).serve_forever()


def cmd_tiled(args) -> None:
    from edgeloop.app.tiled_server import serve

    serve(_config(args))


def cmd_soak(args) -> None:
    from edgeloop.app.soak import run_soak

    run_soak(
        _config(args),
        args.out,
        args.minutes,
        fraction=args.fraction,
        retrain_every_s=args.retrain_every,
        bad_every=args.bad_every,
    )


def cmd_demo(args) -> None:
    from edgeloop.app.demo import run_demo

    cfg = _config(args)
    mode = args.mode or cfg.mode
    points = args.points or {"ptycho": 500, "hedm": 120}[mode]
    run_demo(
        cfg,
        out=args.out,
        scan_points=points,
        epochs=args.epochs,
        mode=mode,
        codec=args.codec,
        rate_hz=args.rate_hz,
        scans=args.scans,
    )


def cmd_hedm_accuracy(args) -> None:
    from edgeloop.app.hedm_accuracy import run

    cfg = _config(args)
    run(
        args.out,
        n_train=args.train_peaks,
        n_test=args.test_peaks,
        epochs=args.epochs,
        width=args.width or cfg.model.braggnn_width,
        cfg=cfg,
    )


def cmd_bench(args) -> None:
    from edgeloop.app.bench import run

    pin_loopback(force=True)  # the bench starts every server: all its traffic stays here
    cfg = _config(args)
    if args.backend:
        cfg.edge.backend = args.backend
    run(
        Path(args.out),
        cfg,
        cases=args.cases,
        seconds=args.seconds,
        pvapy=not args.no_pvapy,
        steady_minutes=args.steady_minutes,
    )


def cmd_ipython_profile(args) -> None:
    from edgeloop.app.ipython_profile import PROFILE, write_profile

    cfg = _config(args)
    path = write_profile(
        cfg.prefix, cfg.data_dir, args.simulated, args.ipython_dir, cfg.positions, cfg.tiled
    )
    print(f"wrote {path}\nstart the session with: ipython --profile={PROFILE}", flush=True)


def cmd_queueserver_profile(args) -> None:
    from edgeloop.app.queueserver_profile import write_profile

    _config(args)  # a configuration that does not load fails here, not in the manager
    try:
        where = write_profile(args.directory, args.config, args.prefix, args.simulated)
    except RuntimeError as exc:
        sys.exit(f"edgeloop queueserver-profile: {exc}")
    print(f"wrote the Queue Server profile in {where}\nstart a Redis server, then: "
          f"{where / 'start-re-manager.sh'}", flush=True)  # fmt: skip


def cmd_screens(args) -> None:
    from edgeloop.app import screens

    for path in screens.write(args.out):
        print(f"wrote {path}")
    if args.render:
        png = screens.render(args.out / f"{args.screen}.bob", args.prefix, args.render)
        print(f"drew {png} from the live PVs of {args.prefix}")


def cmd_status(args) -> None:
    from edgeloop.app.status import print_status

    sys.exit(print_status(args.prefix, beamline=args.beamline, timeout=args.timeout))


def cmd_globus(args) -> None:
    from edgeloop.remote import globus_login

    cfg = _config(args)
    try:
        if args.action == "login":
            if cfg.executor == "globus-flows":
                from edgeloop.remote import flows

                flows.login(cfg)
                print(f"Globus tokens stored in {globus_login.token_file(cfg)}")
                return
            print(f"Globus tokens stored in {globus_login.login(cfg)}")
            return
        globus_login.transfer_client(cfg)
    except globus_login.GlobusLoginError as exc:
        sys.exit(f"edgeloop globus {args.action}: {exc}")
    print(f"Globus Transfer: logged in (tokens in {globus_login.token_file(cfg)})")


def cmd_flows(args) -> None:
    import json

    from edgeloop.remote import flows

    cfg = _config(args)
    transfer = cfg.remote.staging == "globus"
    if args.action == "show":
        definition = flows.flow_definition(transfer)
        print(json.dumps({"definition": definition, "input_schema": flows.INPUT_SCHEMA}, indent=2))
        problems = flows.check_definition(definition)
        if problems:
            sys.exit(f"edgeloop flows show: the definition is wrong: {problems}")
        return
    from edgeloop.remote.globus_login import GlobusLoginError

    try:
        _, flows_client, _ = flows.clients(cfg)
        kept = flows.deploy(cfg, flows_client, flows.compute_client())
    except (GlobusLoginError, ImportError, RuntimeError) as exc:
        sys.exit(f"edgeloop flows deploy: {exc}")
    print(f"flow {kept['flow_id']} deployed; kept in {flows.flow_file(cfg)}")
    print("now `edgeloop globus login` once more (the flow's own consent)")


def _flows_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=("deploy", "show"),
        help="deploy: register the task functions with Globus Compute and create the flow "
        "(once; its id kept in REGISTRY_DIR/flow.json); show: print the definition and its "
        "input schema, checked",
    )


def cmd_models(args) -> None:
    from edgeloop.app import models_cli

    models_cli.run(_config(args), args)


def _models_options(p: argparse.ArgumentParser) -> None:
    from edgeloop.app import models_options

    models_options.add_options(p)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default="SIM:", help="PV prefix (default SIM:)")
    common.add_argument("--config", help="JSON configuration file (see edgeloop.config)")
    common.add_argument("--data-dir", help="where scans are stored (HDF5)")
    common.add_argument("--registry-dir", help="model registry directory")
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log: -v debug, -vv also the libraries' (caproto, p4p, ...)",
    )
    common.add_argument(
        "-q", "--quiet", action="count", default=0, help="less log: -q warnings, -qq errors"
    )
    return common


def _ioc_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--simulate",
        action="store_true",
        help="also the simulated beamline (caproto CA + p4p PVA), on loopback unless "
        "EPICS_CAS_INTF_ADDR_LIST / EPICS_PVAS_INTF_ADDR_LIST say otherwise; its file "
        "plugin writes only under the data directory",
    )
    p.add_argument("--no-ml-ioc", action="store_true", help="only the simulated beamline")
    _access_flags(p)


def _edge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-pv", help="NTNDArray to monitor (default $(P)det:Pva1:Image)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="N worker processes sharing the input through the source's data distributor "
        "(pvDatabase: areaDetector's NDPluginPva, pvapy), answering under the one set of "
        "$(P)edge: PVs; each serves $(P)edge:wK: (default 1: one process)",
    )
    p.add_argument(
        "--worker",
        type=int,
        help="be worker K of an edge run with --workers N --remote-workers (on another host)",
    )
    p.add_argument(
        "--remote-workers",
        action="store_true",
        help="with --workers N: start no worker here; each runs as 'edge --worker K'",
    )
    p.add_argument(
        "--distributor",
        choices=("distributor", "pydistributor"),
        default="distributor",
        help="the source's distributor plugin: pvDatabaseCPP's (areaDetector, pvapy) or "
        "pvapy's own copy (default distributor)",
    )
    _access_flags(p)


def _executor_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        choices=list(EXECUTORS),
        help="where retraining runs (default: the config's, local)",
    )


def _service_options(p: argparse.ArgumentParser) -> None:
    _executor_option(p)
    p.add_argument(
        "--input-pv",
        help="the detector's NTNDArray its live reference watches (default $(P)det:Pva1:Image; "
        "the edge's --input-pv)",
    )


def _demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="edgeloop-demo", help="output directory")
    p.add_argument("--mode", choices=list(MODES), help="technique: ptycho (default) or hedm")
    p.add_argument(
        "--points",
        type=int,
        default=None,
        help="points (ptycho) or angles (hedm) per scan; default 500 / 120",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument(
        "--scans",
        type=int,
        default=None,
        help="continual learning: this many scans of new, partly overlapping regions, "
        "retrained by the policy (ml:AutoRetrain) when it judges it needed; without it, "
        "the short demo (two scans, one retraining by an operator's PV write)",
    )
    p.add_argument(
        "--rate-hz",
        type=_positive_float,
        default=None,
        help="fly-scan rate, frames/s (default: one the edge keeps up with on 2 cores: "
        "ptycho 200, hedm 60)",
    )
    p.add_argument(
        "--codec",
        choices=CODECS,
        help="compress the detector's frames (det:Codec1) as NDPluginCodec does",
    )
    _executor_option(p)


def _soak_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    p.add_argument("--out", default="edgeloop-soak", help="output directory")
    p.add_argument(
        "--fraction", type=float, default=0.8, help="of the measured ceiling (default 0.8)"
    )
    p.add_argument(
        "--retrain-every",
        type=float,
        default=240.0,
        help="seconds between retraining cycles (default 240)",
    )
    p.add_argument(
        "--bad-every", type=int, default=50, help="one malformed frame in N (default 50)"
    )


def _ipython_profile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--simulated",
        action="store_true",
        help="for the simulated beamline on this host (keeps EPICS traffic on loopback)",
    )
    p.add_argument("--ipython-dir", type=Path, help="IPython directory (default ~/.ipython)")


def _screens_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("screens"), help="folder (default screens)")
    p.add_argument("--render", type=Path, help="PNG to draw from the live PVs of --prefix")
    p.add_argument("--screen", choices=("overview", "beamline"), default="overview")


def _globus_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=("login", "status"),
        help="login: log in once (prints a URL, reads the code it shows) and store the "
        "tokens; status: exit 1 unless a stored login serves Transfer",
    )


def _status_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beamline", action="store_true", help="also the simulated beamline's PVs")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for each PV")


def _bench_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="edgeloop-bench", help="output directory (bench.json)")
    p.add_argument("--cases", nargs="+", help="case names (default: all; see bench.json)")
    p.add_argument("--seconds", type=float, default=8.0, help="counting window per run")
    p.add_argument("--backend", help="edge.backend for the edge and the baseline")
    p.add_argument("--no-pvapy", action="store_true", help="skip pvapy's client and framework")
    p.add_argument(
        "--steady-minutes",
        type=float,
        default=0.0,
        help="then stream ptycho512 (else the first case run) at 80%% of its e2e rate this long",
    )


def _queueserver_profile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="where to write the profile")
    p.add_argument(
        "--simulated",
        action="store_true",
        help="the simulated beamline on this host: pin EPICS traffic to loopback",
    )


def _tiled_options(p: argparse.ArgumentParser) -> None:
    pass  # --data-dir and --config (common) say where and on which port


def _hedm_accuracy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="edgeloop-hedm-accuracy", help="output directory")
    p.add_argument("--train-peaks", type=int, default=20000)
    p.add_argument("--test-peaks", type=int, default=1000)
    p.add_argument(
        "--epochs", type=int, default=60, help="training epochs (a narrow --width needs ~60)"
    )
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="BraggNN channels (default: the config's model.braggnn_width, 16; the "
        "published 64 misses the >=100x target on one core)",
    )


def _commands() -> tuple:
    """(name, function, help, options): the commands in the order --help lists them (looked
    up when the parser is built, so a test can replace a command's function)."""
    return (
        (
            "ioc",
            cmd_ioc,
            "the ML IOC (db/); with --simulate, a simulated beamline too",
            _ioc_options,
        ),
        ("edge", cmd_edge, "edge inference server", _edge_options),
        (
            "retrain-service",
            cmd_retrain_service,
            "watch $(P)ml:Retrain and run retraining on the configured executor",
            _service_options,
        ),
        (
            "tiled",
            cmd_tiled,
            "the embedded Tiled server where runs are stored (under DATA_DIR/tiled, at the "
            "config's tiled.port), unless tiled.uri names a facility's",
            _tiled_options,
        ),
        ("demo", cmd_demo, "run the whole loop once and report", _demo_options),
        (
            "soak",
            cmd_soak,
            "run the loop unattended: stream at a fraction of the edge's ceiling with malformed "
            "frames mixed in, retrain and hot-swap every few minutes; writes DIR/soak.json",
            _soak_options,
        ),
        (
            "ipython-profile",
            cmd_ipython_profile,
            "write the IPython profile 'edgeloop': a Bluesky session with the devices, plans, RE, "
            "live table, progress bar, live plot of the edge, ScanWriter and RetrainTrigger",
            _ipython_profile_options,
        ),
        (
            "queueserver-profile",
            cmd_queueserver_profile,
            "write DIR: the Bluesky Queue Server's startup code (devices, annotated plans, the "
            "RunEngine recording runs with the RetrainTrigger), user group permissions and "
            "the list of plans and devices",
            _queueserver_profile_options,
        ),
        (
            "screens",
            cmd_screens,
            "write the Phoebus screens (overview.bob, beamline.bob) and Phoebus settings file; "
            "optionally draw one from the live PVs as a PNG",
            _screens_options,
        ),
        (
            "status",
            cmd_status,
            "print every edgeloop PV of the prefix (value, units, severity, connected); exit 1 "
            "naming those that do not answer",
            _status_options,
        ),
        (
            "globus",
            cmd_globus,
            "log in to Globus Transfer once for remote.staging = globus (tokens stored and "
            "refreshed), or check the stored login",
            _globus_options,
        ),
        (
            "flows",
            cmd_flows,
            "the retraining's remote steps as one Globus Flow (executor globus-flows): deploy "
            "it once, or show its definition",
            _flows_options,
        ),
        (
            "models",
            cmd_models,
            "the model records (ONNX graph, weights, model card, checksums, the gate's "
            "signature): list and filter the versions, show a card, export a record as one "
            "archive, verify records",
            _models_options,
        ),
        (
            "bench",
            cmd_bench,
            "edge speed per frame size beside its ceilings and pvapy's",
            _bench_options,
        ),
        (
            "hedm-accuracy",
            cmd_hedm_accuracy,
            "BraggNN vs pseudo-Voigt fitting on fresh simulated peaks (accuracy, speed)",
            _hedm_accuracy_options,
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options (the docs' command reference is generated from it)."""
    parser = argparse.ArgumentParser(prog="edgeloop", description=__doc__)
    common = _common_options()
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_, options in _commands():
        p = sub.add_parser(name, help=help_, description=help_, parents=[common])
        p.set_defaults(func=func)
        options(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config_logging(verbosity_level(args.verbose, args.quiet), libraries=args.verbose >= 2)
    with signals.stop_on_signals():  # SIGTERM stops a command as Ctrl-C does
        try:
            args.func(args)
        except KeyboardInterrupt:  # the command's own finally blocks stopped what it started
            sys.exit(signals.exit_code() or 130)
    if signals.exit_code():  # a server that returned after its stop
        sys.exit(signals.exit_code())


if __name__ == "__main__":
    main()
