from redserve.cli import main

raise SystemExit(main())
