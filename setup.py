import re

from setuptools import setup

# The version lives in wsboard.py alone; importing it here would run gevent's monkey-patching.
with open("wsboard.py", encoding="utf-8") as module:
    VERSION = re.search(r'^__version__ = "([^"]+)"', module.read(), re.MULTILINE).group(1)

setup(
    name="wsboard",
    version=VERSION,
    description="A small, fast, safe WebSocket push server beside a request/response web app",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    py_modules=["wsboard", "wsboard_client"],
    # The views travel as package data, so every install mode (venv, --user, --target,
    # wheel) finds them next to the code.
    packages=["wsboard_views"],
    package_dir={"wsboard_views": "views"},
    package_data={"wsboard_views": ["*.tpl", "static/*", "gunicorn.conf.py"]},
    install_requires=[
        "gevent>=24",
        "gevent-websocket==0.10.1",
        "bottle>=0.13,<0.14",
        # C-speed UTF-8 checks: gevent-websocket uses it when present (pure Python blocks the hub)
        "wsaccel>=0.6.6",
    ],
    extras_require={
        "gunicorn": ["gunicorn[gevent]>=23"],
        # Scale-out over many processes and hosts (--redis); hiredis parses replies in C.
        "redis": ["redis>=5,<9", "hiredis>=2"],
        # /metrics in Prometheus's format.
        "metrics": ["prometheus_client>=0.17"],
        "test": [
            "redis>=5,<9",
            "hiredis>=2",
            "pusher>=3.3",  # the Pusher server SDK, a real client of the Pusher HTTP API
            "prometheus_client>=0.17",
            "pytest>=8",
            "hypothesis>=6",
            "websocket-client>=1.7",
            "websockets>=12",  # a client that speaks permessage-deflate (tests/test_compression)
            "selenium>=4.20",
            "gunicorn[gevent]>=23",
            "ruff>=0.6",
            "atheris>=2.3",  # coverage-guided fuzzing of the parsers (tests/fuzz)
        ],
    },
    entry_points={"console_scripts": ["wsboard = wsboard:main"]},
)
