"""Language routing: which block pack (or the resident) serves a request."""

from modserve.router.route import Router, RoutingDecision, UnknownLanguageError

__all__ = ["Router", "RoutingDecision", "UnknownLanguageError"]
