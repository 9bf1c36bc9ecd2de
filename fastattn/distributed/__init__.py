"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

:func:`context_parallel_attention` takes each rank's shards of q, k, v and returns its shard of the
exact result (values, lse and gradients of :func:`fastattn.attention` on the gathered sequence);
:func:`shard` / :func:`unshard` split a full sequence into a rank's shard and gather it back.
See docs/context-parallel.md.
"""

from .attention import SCHEMES, context_parallel_attention
from .layout import LAYOUTS, shard, unshard

__all__ = ["LAYOUTS", "SCHEMES", "context_parallel_attention", "shard", "unshard"]
