from sinkless.cli import main

raise SystemExit(main())
