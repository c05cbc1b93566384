"""Options: each capability in a module of its own, off unless a flag or an input asks for it.
The core names each at one line, where its option is read; an extras module imports only the core
below the module that names it (never a command), so no import ever runs back up.
"""
