<?php
// Without Composer: require this file once, then use Wsboard\Client.
spl_autoload_register(static function (string $class): void {
    if (str_starts_with($class, 'Wsboard\\')) {
        $file = __DIR__ . '/src/' . str_replace('\\', '/', substr($class, 8)) . '.php';
        if (is_file($file)) {
            require $file;
        }
    }
});
