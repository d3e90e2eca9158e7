"""Language routing: which block pack (or the resident) serves a request."""

from modserve.router.route import RESIDENT, Router, RoutingDecision, UnknownLanguageError

__all__ = ["RESIDENT", "Router", "RoutingDecision", "UnknownLanguageError"]
