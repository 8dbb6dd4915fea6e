"""`python app.py [--model PATH_OR_HUB_ID_OR_PRESET] [--db URL] [--data-dir DIR] [--host H] [--port P]
[--share] [--device D] [--dtype T]`: serve the SPHINX-X web app (a Hugging Face Space runs this file)."""
import sys

from app.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
