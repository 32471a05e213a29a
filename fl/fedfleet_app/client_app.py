"""ClientApp: trains and evaluates on the participant's own data, which never leaves it.

Node config (set per SuperNode by fedfleet):
    data-path       the participant's data directory on this VM (required)
    participant     the participant's name, vm: the VM's name (reported with metrics)
    worker-socket   the VM's warm worker (worker.py) and the file holding its key;
    worker-key      without them, or if the worker does not answer, the work is
                    done in this process with the same code

This module imports neither torch nor the data code: a fresh process runs it for
every message, and with the worker they are never needed here.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from . import worker
from .settings import EVAL_RECORD, SITE_RECORD, WEIGHTS, AppSettings, model_file


def _client_side_clipping(msg: Message, context: Context, call_next: Any) -> Message:
    """With `dp: client-fixed|client-adaptive`, each update is clipped here, before it leaves
    the site, by Flower's own mods (the server's DP wrapper sends the norm); otherwise a no-op."""
    mode = str(context.run_config.get("dp", ""))
    if msg.metadata.message_type != "train" or not mode.startswith("client-"):
        return call_next(msg, context)  # type: ignore[no-any-return]
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    mod = fixedclipping_mod if mode == "client-fixed" else adaptiveclipping_mod
    return mod(msg, context, call_next)


app = ClientApp(mods=[_client_side_clipping])


def _process_started() -> float:
    """Wall-clock start of this process (Linux /proc), to split a phase's overhead."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", encoding="ascii") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return float("nan")


PROCESS_STARTED = _process_started()


def _compute(context: Context, request: dict[str, Any], settings: AppSettings) -> tuple[dict[str, Any], str]:
    """Run `request` on the VM's worker, or here if there is none; say which."""
    node = context.node_config
    if "data-path" in node:
        data_path = str(node["data-path"])
    elif "partition-id" in node and settings.simulation_data_root:
        data_path = f"{settings.simulation_data_root}/{node['partition-id']}"
    else:
        raise RuntimeError(
            "this SuperNode has no data-path in its node config; start it with "
            "--node-config 'data-path=\"/path/to/site/data\"'"
        )
    request = {**request, "data_path": data_path, "run_config": settings.to_run_config()}
    if settings.model:  # the worker loads the stack's model from this app's copy of its file
        request["model_file"] = model_file(settings.model)
    try:
        return (
            worker.call(
                str(node.get("worker-socket", "")),
                str(node.get("worker-key", "")),
                request,
                settings.round_timeout,
            ),
            "worker",
        )
    except worker.WorkerUnavailable as why:
        if node.get("worker-socket"):
            log(30, "fedfleet worker unavailable (%s); computing in-process", why)
        return worker.handle(request), "in-process"


def _site(context: Context, mode: str) -> ConfigRecord:
    node = context.node_config
    return ConfigRecord(
        {
            "participant": str(node.get("participant", "")),
            "vm": str(node.get("vm", "")),
            "compute": mode,
            "process-started": PROCESS_STARTED,
        }
    )


def _weights(msg: Message) -> Any:
    return msg.content.array_records["arrays"][WEIGHTS].numpy()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    started = time.time()
    settings = AppSettings.from_run_config(context.run_config)
    config = msg.content.config_records["config"]
    result, mode = _compute(
        context,
        {
            "op": "train",
            "weights": _weights(msg),
            "evaluate_received": bool(config.get("evaluate-received", False)),
            "proximal_mu": float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
            "server_round": int(config.get("server-round", 0)),  # type: ignore[arg-type]
        },
        settings,
    )
    site = _site(context, mode)
    site["handler-started"], site["handler-finished"] = started, time.time()
    content = RecordDict(
        {
            "arrays": ArrayRecord({WEIGHTS: Array(result["weights"])}),
            "metrics": MetricRecord(result["metrics"]),
            SITE_RECORD: site,
        }
    )
    if "evaluation" in result:
        content[EVAL_RECORD] = ConfigRecord(result["evaluation"])
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    started = time.time()
    settings = AppSettings.from_run_config(context.run_config)
    result, mode = _compute(context, {"op": "evaluate", "weights": _weights(msg)}, settings)
    site = _site(context, mode)
    site["handler-started"], site["handler-finished"] = started, time.time()
    return Message(
        content=RecordDict({"metrics": MetricRecord(result["metrics"]), SITE_RECORD: site}),
        reply_to=msg,
    )
