"use strict";function handleRequest(e){return{data:e,meta:{version:"2"}}}module.exports={handleRequest};
//# sourceMappingURL=app.js.map
