from flexnbd.cli import main

raise SystemExit(main())
