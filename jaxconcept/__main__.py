import sys

from jaxconcept.cli import main

sys.exit(main())
