"""optlayers.layers — what users embed: functional forms returning Results, and nn.Modules."""

from .deq import DEQ, DEQInfo, PhantomGradient

__all__ = ["DEQ", "DEQInfo", "PhantomGradient"]
