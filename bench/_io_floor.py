"""The I/O floor of a merge: read every input tensor of base + 3 fine-tunes once and
write one model's worth of output through the same streaming writer."""

import sys
from pathlib import Path

from evomerge.operators.checkpoint import open_checkpoint
from evomerge.operators.writer import ShardWriter

work, out = Path(sys.argv[1]), Path(sys.argv[2])
ckpts = [open_checkpoint(work / n) for n in ("base", "ft1", "ft2", "ft3")]
out.mkdir(parents=True)
infos = list(ckpts[0].tensors.values())
writer = ShardWriter(out, [(i.name, i.shape, i.dtype) for i in infos], 5 * 1024**3)
for info in infos:
    tensors = [c.get(info.name) for c in ckpts]  # each read copies its bytes into memory
    writer.write(info.name, tensors[0])
writer.finish()
