"""An in-process Flower grid: every message goes at once to the real ClientApp, no Ray, no
SuperLink.

The ServerApp's pipeline (``strategies.server_app.run_pipeline``) runs on it unchanged, each
node's ``context.state`` kept between messages as in deployment, so what it reports (bytes per
phase, rounds, metrics) is what a simulation or a deployment of the same run config reports; the
devices run one after the other in this process. The tests, the secure-sum benchmark and
``peel-fed privacy`` use it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.client_app import make_client_app

FIRST_NODE_ID = 100


def node_context(node: int, partition: int, partitions: int) -> Context:
    """The context a SuperNode hosting ``partition`` of ``partitions`` gives the ClientApp."""
    node_config = {"partition-id": partition, "num-partitions": partitions}
    return Context(1, node, node_config, RecordDict(), {})


class LocalGrid:
    """A grid of ``num_nodes`` in-process nodes; node ``100 + p`` hosts partition ``p``. An
    exception in a handler becomes an error reply (a device failure, which the server survives
    or reports), as on a SuperNode."""

    def __init__(self, num_nodes: int, app: ClientApp | None = None) -> None:
        self.app = make_client_app() if app is None else app
        self.contexts = {
            FIRST_NODE_ID + p: node_context(FIRST_NODE_ID + p, p, num_nodes)
            for p in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}
        self.types: list[str] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def reply(self, msg: Message) -> Message:
        """The node's reply to ``msg`` (subclasses plant failures here)."""
        return self.app(msg, self.contexts[msg.metadata.dst_node_id])

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex  # the SuperLink's job
            self.types.append(msg.metadata.message_type)
            try:
                reply = self.reply(msg)
            except Exception as exc:  # noqa: BLE001 (a device failure becomes an error reply)
                reply = Message(Error(0, repr(exc)), reply_to=msg)
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [self.replies.pop(m) for m in message_ids if m in self.replies]


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """Set what a running ServerApp sets before it builds messages (Flower's task identity),
    and restore it after."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_node_id", "_task_id")
    saved = {name: getattr(TaskIdentity, name, None) for name in names}
    for name in names:
        setattr(TaskIdentity, name, 1)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)
