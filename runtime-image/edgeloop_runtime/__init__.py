"""edgeloop's node runtime. It never imports the operator: the two meet only through this
package's command line and environment, which the operator's templates render."""

__version__ = "0.1.0"
