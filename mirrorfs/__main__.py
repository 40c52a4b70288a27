from mirrorfs.cli.main import main

raise SystemExit(main())
