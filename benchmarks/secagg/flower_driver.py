"""Flower's SecAgg+ (flwr 1.42), driven in one process, for bench_flower.py.

Runs under /work/flwr-venv/bin/python (flwr is NOT a project dependency). It runs Flower's own
server-side `SecAggPlusWorkflow` unmodified, with an in-memory `Grid` whose
`send_and_receive` hands each message straight to Flower's own client-side `secaggplus_mod`
(the ClientApp mod), with a fit function that returns a pre-generated float32 update. No
network, no Ray, no SuperLink: what is timed is Flower's protocol code on both sides.

Timing (CPU seconds of this process, time.process_time, robust on a shared machine; the
total is also given as wall time): every call of `secaggplus_mod` for node i is added to
client_seconds[i] (the fit
function's own time, wrapping a pre-generated array, is included and small); messages go
through Flower's own protobuf serialisation both ways (wire_s, as a real transport would);
the server time is the workflow's wall time minus client and wire time. Dropouts: the chosen
nodes do not answer the 'collect masked vectors' stage (they crash after ShareKeys).

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod.secure_aggregation.secaggplus_mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from flwr.serverapp.grid import Grid
from flwr.supercore.task_identity import TaskIdentity


class InMemoryGrid(Grid):
    def __init__(self, node_ids, updates, dropouts, clock):
        self.node_ids = list(node_ids)
        self.updates = updates
        self.dropouts = set(dropouts)
        self.clock = clock
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
            for nid in self.node_ids
        }
        self.client_seconds = dict.fromkeys(self.node_ids, 0.0)
        self.wire_seconds = 0.0
        self._counter = 0

    def set_run(self, run):  # pragma: no cover - unused
        self._run = run

    @property
    def run(self):  # pragma: no cover - unused
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )

    def get_node_ids(self):
        return self.node_ids

    def push_messages(self, messages):  # pragma: no cover - unused
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - unused
        raise NotImplementedError

    def _fit(self, msg, ctxt):
        nid = ctxt.node_id
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters([self.updates[nid]]),
            num_examples=100,
            metrics={},
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if nid in self.dropouts and stage == Stage.COLLECT_MASKED_VECTORS:
                continue  # crashed after ShareKeys: never answers again
            if nid in self.dropouts and stage == Stage.UNMASK:
                continue
            # Give the message the ids a SuperLink would (reply_to needs them).
            self._counter += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._counter}"
            msg.metadata.__dict__["_src_node_id"] = 0
            delivered = self._wire(msg)
            t0 = self.clock()
            reply = secaggplus_mod(delivered, self.contexts[nid], self._fit)
            self.client_seconds[nid] += self.clock() - t0
            self._counter += 1
            reply.metadata.__dict__["_message_id"] = f"m{self._counter}"
            replies.append(self._wire(reply))
        return replies

    def _wire(self, msg):
        """Flower's own protobuf serialisation both ways, as over a real transport (each
        client must get its own copy: the client mod mutates the config it receives)."""
        t0 = self.clock()
        data = message_to_proto(msg).SerializeToString()
        out = message_from_proto(ProtoMessage.FromString(data))
        self.wire_seconds += self.clock() - t0
        return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--num-shares", type=int, default=11)
    ap.add_argument("--threshold", type=int, default=6)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    # What a ServerApp process gets from the SuperLink: the identity its messages carry.
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1

    gen = np.random.default_rng(args.seed)
    node_ids = [1000 + i for i in range(args.n)]
    updates = {nid: gen.uniform(-1, 1, args.d).astype(np.float32) for nid in node_ids}
    dropouts = set(gen.choice(node_ids, int(args.dropout * args.n), replace=False).tolist())
    grid = InMemoryGrid(node_ids, updates, dropouts, time.process_time)

    manager = SimpleClientManager()
    for nid in node_ids:
        manager.register(GridClientProxy(nid, grid, 1))
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.n,
        min_available_clients=args.n,
    )
    base = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(args.d, dtype=np.float32)]), keep_input=True
    )
    workflow = SecAggPlusWorkflow(
        num_shares=args.num_shares, reconstruction_threshold=args.threshold, clipping_range=8.0
    )
    t0, c0 = time.perf_counter(), time.process_time()
    workflow(grid, context)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0

    # Correctness: FedAvg of the survivors (equal weights) within quantisation error.
    arrays = context.state.array_records[MAIN_PARAMS_RECORD]
    params = compat.arrayrecord_to_parameters(arrays, keep_input=True)
    got = parameters_to_ndarrays(params)[0]
    survivors = [nid for nid in node_ids if nid not in dropouts]
    want = np.mean([updates[nid] for nid in survivors], axis=0)
    err = float(np.max(np.abs(got - want)))
    client = [grid.client_seconds[nid] for nid in survivors]
    client_all = sum(grid.client_seconds.values())
    print(
        json.dumps(
            {
                "impl": "flower",
                "flwr_version": __import__("flwr").__version__,
                "n": args.n,
                "d": args.d,
                "num_shares": args.num_shares,
                "threshold": args.threshold,
                "dropouts": len(dropouts),
                "total_s": total,
                "total_cpu_s": total_cpu,
                "client_mean_cpu_s": float(np.mean(client)),
                "client_max_cpu_s": float(np.max(client)),
                "server_cpu_s": total_cpu - client_all - grid.wire_seconds,
                "wire_cpu_s": grid.wire_seconds,
                "max_abs_error": err,
                "correct": err < 1e-3,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
