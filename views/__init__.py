"""wsboard's templates and static files, installed as package data beside wsboard.py."""
