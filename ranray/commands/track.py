"""`ranray track ...`: the MLflow side of runs and of the team's tracking server.

    sync RUN_DIR     push what a run kept locally (RUN_DIR/metrics.jsonl) while its server was away
                     or refused it; the run's owner does this itself when it ends and the server
                     answers again, otherwise this command does, into the run tracking.json records
    server           run the team's MLflow server (basic auth, backups): ranray.tracking_server
    backup           copy the server's SQLite databases to its backup folder now
    user add|grant   users and their permissions on a server with authentication, as its admin
"""

from __future__ import annotations

import argparse

HELP = ("MLflow: `sync RUN_DIR` pushes locally kept records; `server`, `backup`, `user` run and "
        "administer the team's tracking server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    sync = actions.add_parser("sync", help="push RUN_DIR/metrics.jsonl to the MLflow store")
    sync.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (storage_path/run_name)")
    sync.add_argument("--tracking-uri", help="the store to push to (default: the one in RUN_DIR/tracking.json)")
    sync.add_argument("--credentials", default="",
                      help="the run's user's credentials file for a server with authentication (MLflow's "
                           "format; default: as jobs find them, e.g. ~/.mlflow/credentials)")
    for name, what in (("server", "run the team's MLflow server in the foreground"),
                       ("backup", "copy the server's SQLite databases to its backup_dir now")):
        sub = actions.add_parser(name, help=what)
        sub.add_argument("--config", default=None, help="a server config (e.g. cluster/mlflow_server.yaml)")
        sub.add_argument("overrides", nargs="*", metavar="key=value")
    user = actions.add_parser("user", help="add a user, or grant one a permission on an experiment")
    user.add_argument("--tracking-uri", default=None, help="the server (default: $MLFLOW_TRACKING_URI)")
    user.add_argument("--credentials", default="",
                      help="an admin's credentials file (default: as jobs find them)")
    what = user.add_subparsers(dest="user_action", metavar="add|grant")
    what.required = True
    add = what.add_parser("add", help="create a user with the password in a file")
    add.add_argument("username")
    add.add_argument("--password-file", required=True, help="a file holding the new user's password")
    add.add_argument("--write-credentials", default="",
                     help="also write the user's credentials file here (mode 600), for a job's secret")
    grant = what.add_parser("grant", help="give a user a permission on an experiment (created when missing) "
                                          "or, with --model, on a registered model")
    grant.add_argument("username")
    grant.add_argument("experiment", metavar="EXPERIMENT|MODEL")
    grant.add_argument("permission", help="READ, EDIT, MANAGE or NO_PERMISSIONS")
    grant.add_argument("--model", action="store_true", help="the second name is a registered model's")


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.action](args)


def _sync(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ranray.tracking import SyncError, sync_run_dir

    if not Path(args.run_dir).is_dir():
        print(f"ranray track sync: {args.run_dir} is not a directory")
        return 2
    try:
        report = sync_run_dir(args.run_dir, args.tracking_uri, credentials_file=args.credentials)
    except SyncError as err:
        print(f"ranray track sync: {err}")
        return 1
    if not report.counts:
        print(f"{args.run_dir}: nothing kept locally, nothing to push")
        return 0
    print(f"pushed {report.line()}")
    return 0


def _server_config(args: argparse.Namespace):
    from ranray.config import TrackingServerConfig, load_config

    return load_config(TrackingServerConfig, args.config, args.overrides)


def _server(args: argparse.Namespace) -> int:
    import logging

    from ranray.tracking_server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s ranray track server: %(message)s")
    return serve(_server_config(args))


def _backup(args: argparse.Namespace) -> int:
    from ranray.tracking_server import backup

    cfg = _server_config(args)
    record = backup(cfg)
    copied = ", ".join(f"{name} ({size} bytes)" for name, size in record["bytes"].items()) or "nothing"
    print(f"backed up {copied} from {cfg.db_dir} to {cfg.backup_dir}")
    return 0


def _user(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ranray.config import ConfigError
    from ranray.tracking_access import write_credentials_file
    from ranray.tracking_server import Admin, read_password

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise ConfigError("ranray track user: which server? --tracking-uri http://HEAD:5000 (or MLFLOW_TRACKING_URI)")
    admin = Admin(uri, args.credentials)
    if args.user_action == "grant":
        resource_id = admin.grant(args.username, args.experiment, args.permission, model=args.model)
        what = "registered model" if args.model else f"experiment ({resource_id})"
        print(f"{args.username}: {args.permission} on {what} '{args.experiment}' in {uri}")
        return 0
    password = read_password(args.password_file, "--password-file")
    admin.add_user(args.username, password)
    print(f"added user '{args.username}' to {uri}")
    if args.write_credentials:
        written = write_credentials_file(Path(args.write_credentials), args.username, password)
        print(f"wrote {args.username}'s credentials to {written}")
    return 0


ACTIONS = {"sync": _sync, "server": _server, "backup": _backup, "user": _user}
