"""The command-line programs: ``ntkdfl-train``, ``ntkdfl-compare``, ``ntkdfl-byzantine``,
``ntkdfl-selection`` and ``ntkdfl-reproduce`` (``[project.scripts]``); ``python
launchers/<name>.py`` runs the same.

Each parses flags (``ntkdfl_tf.cli.flags``) and calls one library function.
"""
