"""The NBD server: the protocol without sockets (``protocol``) and the service that
serves block exports with it (``service``)."""
