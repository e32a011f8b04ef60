from stabilitylab.cli import main

raise SystemExit(main())
