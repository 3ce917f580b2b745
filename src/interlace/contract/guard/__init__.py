"""Layer 2 of the sandbox: shipped code compiled under guards, and the modules it may reach.

`transform.guard_module` rewrites the AST, `access.JobGuards` is what the rewritten code calls
for one job (attribute, item, write and iteration guards, the wall-time and memory ticks),
`modules` the read-only module proxies. See README.md.
"""

from .access import AccessRefused, JobGuards, JobLimitExceeded
from .modules import MODULE_RULES, BodyAPI, ModuleProxy, allowed_object, body_api, module_proxy, proxy_for
from .transform import GUARD_NAMES, GuardTransformer, guard_module

__all__ = [
    "AccessRefused", "JobGuards", "JobLimitExceeded", "MODULE_RULES", "BodyAPI", "ModuleProxy", "allowed_object",
    "body_api", "module_proxy", "proxy_for", "GUARD_NAMES", "GuardTransformer", "guard_module",
]
