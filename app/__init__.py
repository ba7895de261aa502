"""The application: the one ``edgezo`` command, the demo, and what ties the roles together in one process.

``edge``, ``cloud``, ``convert`` and ``protocol`` never import each other except downward into ``protocol`` (and
``convert``'s GGUF helpers); only this package may import them all (tests/test_layout.py enforces it).
"""
