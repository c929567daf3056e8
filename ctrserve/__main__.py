from ctrserve.cli import main

raise SystemExit(main())
