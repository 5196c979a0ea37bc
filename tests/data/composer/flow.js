// flow.json is this file compiled by the real openwhisk-composer 0.12.0 (npm): `npx compose flow.js > flow.json`
const composer = require('openwhisk-composer')

module.exports = composer.sequence(
  'double',
  composer.if(composer.action('positive'), 'double', composer.literal({ n: 0 })),
  composer.retain('double'))
