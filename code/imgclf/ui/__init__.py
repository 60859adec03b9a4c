"""A page to try a model in the browser: `python -m imgclf.local serve --model ... --ui`.

    index.html   the page (plain HTML, CSS and JavaScript in one file: no build step, nothing from the network)
    server.py    serves the page and forwards POST /invocations and GET /ping to the model server
    chromium.py  headless Chromium over the DevTools protocol (the page's test, screenshots of our HTML pages)
"""
