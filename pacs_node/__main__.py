from pacs_node.app.cli import main

raise SystemExit(main())
