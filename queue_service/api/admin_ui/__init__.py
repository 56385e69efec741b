"""The admin page: index.html, app.js and app.css, served by api.routes.admin."""
