"""A hostile SuperNode, for tests/test_deployment.py: put this folder on a SuperNode's
PYTHONPATH and every train reply its ClientApp process sends is poisoned after the honest
ClientApp made it — the update's values times 1e4 plus 1 (finite, huge), re-encoded with the codec
the server asked for (so only the server's bounds can stop it), and ``num-examples`` = 1e15 (a
weight takeover). The honest code is not changed: Flower's ``ClientApp.__call__`` is wrapped when
this interpreter starts, as a node operator who controls their machine could do. The node spells
its payloads' tensor tables out (payload format 1) whatever ``payload-table`` says, so it can read
and rewrite them without knowing the shapes; a server must accept either format."""

import os
import sys

if os.environ.get("FEDLORA_TEST_HOSTILE") == "1":
    try:
        from flwr.clientapp import client_app as _client_app
    except Exception:  # not a Flower process: nothing to do
        _client_app = None
    if _client_app is not None:
        _honest = _client_app.ClientApp.__call__

        def _poisoned(self, message, context):
            honest_app = sys.modules.get("fedlora.client_app")
            if honest_app is not None:
                honest_app.by_digest = lambda payload_table: False  # format-1 payloads
            reply = _honest(self, message, context)
            try:
                if message.metadata.message_type == "train" and not reply.has_error():
                    from flwr.app import MetricRecord

                    from fedlora.wire import decode_record, encode_record, record_spec

                    record = reply.content.array_records["adapter"]
                    spec = record_spec(record)
                    tensors = decode_record(record)
                    reply.content["adapter"] = encode_record(
                        {k: v * 1e4 + 1.0 for k, v in tensors.items()}, spec)
                    metrics = dict(reply.content.metric_records["metrics"])
                    metrics["num-examples"] = 10 ** 15
                    reply.content["metrics"] = MetricRecord(metrics)
                    print("[hostile] poisoned a train reply", file=sys.stderr, flush=True)
            except Exception as err:  # make a broken attack visible in the node's log
                print(f"[hostile] could not poison the reply: {err!r}", file=sys.stderr,
                      flush=True)
            return reply

        _client_app.ClientApp.__call__ = _poisoned
