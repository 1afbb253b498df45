"""An edge in this process on a private pvAccess network (p4p's ``isolate=True``): the unit
tier's edge, fed by a SharedPV the test posts frames on, read by a client of that network."""

from p4p.client.thread import Context
from p4p.server import Server
from p4p.server.thread import SharedPV

from edgeloop.config import Config
from tests.kit.servers import PvReader


class IsolatedEdge(PvReader):
    """``source``: the input SharedPV; ``ctx``: a client of the edge's own server; the
    reading helpers are those of tests.kit.servers.System."""

    def __init__(self, cfg: Config):
        from edgeloop.edge_pva.server import EdgeServer

        self.cfg, self.prefix = cfg, cfg.prefix
        self.source = SharedPV()
        channel = f"{cfg.prefix}src:Image"
        self._source_server = Server(providers=[{channel: self.source}], isolate=True)
        client = {"conf": self._source_server.conf(), "useenv": False}
        self.edge = EdgeServer(cfg, channel, server_args={"isolate": True}, client_args=client)
        self.edge.start()
        self.ctx = Context("pva", conf=self.edge.server_conf, useenv=False, nt=False)

    def close(self) -> None:
        self.ctx.close()
        self.edge.stop()
        self._source_server.stop()
