"""The error every devcluster operation raises for a condition the user can act on."""


class ClusterError(RuntimeError):
    pass
