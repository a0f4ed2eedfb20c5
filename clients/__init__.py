"""Applications built on the Usher client library (installed as
``usher.clients``): ``ush``, the Usher shell."""
