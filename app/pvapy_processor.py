"""The baseline ``edgeloop bench`` compares the edge with: pvapy's own streaming framework
(``pvapy-hpc-consumer``) running the edge's model on the same frames, one frame per call.

    pvapy-hpc-consumer --input-channel CH --output-channel OUT \\
        --processor-class edgeloop.app.pvapy_processor.EdgeloopProcessor \\
        --processor-args '{"config": "cfg.json"}'

Ptychography: the phase is published on OUT as an NTNDArray; HEDM: the peak centres, an
(n, 2) NTNDArray.  Each answer keeps its frame's uniqueId and time stamp, so a client
measures what it measures on ``edge:Phase``/``edge:Peaks``.
"""

from __future__ import annotations

import numpy as np
import torch
from pvapy.hpc.adImageProcessor import AdImageProcessor

from edgeloop import codecs
from edgeloop.config import MODE_KIND, Config
from edgeloop.edge_pva.inference import untrained_model
from edgeloop.edge_pva.peak_tables import locate_peaks


class EdgeloopProcessor(AdImageProcessor):
    def __init__(self, configDict=None):  # noqa: N803 (pvapy's name)
        super().__init__(configDict or {})
        self.cfg = Config.load((configDict or {}).get("config"))
        torch.set_num_threads(self.cfg.edge.threads)
        self.mode = self.cfg.mode
        self.served = untrained_model(self.cfg, MODE_KIND[self.mode])
        self.answered = 0

    def _pixels(self, pv) -> np.ndarray:
        dims = pv["dimension"]
        nx, ny = dims[0]["size"], dims[1]["size"]
        codec = pv["codec"]["name"]
        ((key, flat),) = pv["value"][0].items()
        flat = np.asarray(flat)
        if codec:
            dtype = codecs.pixel_type(pv["codec"]["parameters"][0]["value"])
            declared = int(pv["uncompressedSize"])
            flat = codecs.decompress(codec, flat, dtype, declared, self.cfg.edge.max_frame_bytes)
        return flat.reshape(ny, nx)

    def process(self, pvObject):  # noqa: N803 (pvapy's name)
        frame = self._pixels(pvObject)
        if self.mode == "hedm":
            edge = self.cfg.edge
            peaks, _, _ = locate_peaks(
                frame,
                self.served.infer,
                self.served.input_size,
                sigma=edge.peak_sigma,
                min_separation=edge.peak_min_separation,
                max_peaks=edge.max_peaks_per_frame,
            )
            answer = np.stack([peaks["x"], peaks["y"]], axis=1).astype(np.float32)
            if not len(answer):
                answer = np.zeros((1, 2), np.float32)
        else:
            _, phase = self.served.infer([frame])
            answer = phase[0, 0]
        out = self.generateNtNdArray2D(pvObject["uniqueId"], answer)
        out["timeStamp"] = pvObject["timeStamp"]
        self.updateOutputChannel(out)
        self.answered += 1
        return pvObject

    def getStats(self):  # noqa: N802 (pvapy's name)
        return {"answered": self.answered}
